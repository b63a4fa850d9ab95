"""A tiny ASGI app for uvicorn that says who it is: the end-to-end tests' real HTTP backend.

``/`` and ``/who`` answer the app's name (``APP_NAME``); ``/health`` answers
``APP_HEALTH_STATUS`` (200 unless set, 503 for an app that must never get traffic).
No framework: the ASGI protocol alone, so nothing but uvicorn is needed.
"""

import os

NAME = os.environ.get("APP_NAME", "app").encode()
HEALTH_STATUS = int(os.environ.get("APP_HEALTH_STATUS", "200"))


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path in ("/", "/who"):
        status, body = 200, NAME
    elif path == "/health":
        status, body = HEALTH_STATUS, b"healthy\n" if HEALTH_STATUS == 200 else b"unhealthy\n"
    else:
        status, body = 404, b"not found\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
