"""A websocket echo server (the ``websockets`` library, asyncio): ``NAME:message`` for every message.

Usage: ``python ws_echo.py NAME PORT``; it listens on 127.0.0.1:PORT and prints
``listening`` once it accepts connections. It runs until it is killed.
"""

import asyncio
import sys

from websockets.asyncio.server import serve


async def main(name: str, port: int) -> None:
    async def echo(websocket):
        async for message in websocket:
            await websocket.send("%s:%s" % (name, message))

    async with serve(echo, "127.0.0.1", port) as server:
        print("listening on 127.0.0.1:%d" % port, flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
