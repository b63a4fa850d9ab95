"""The ``fastlb`` command: parse the command line, set up logging, run the balancer.

``fastlb demo`` runs the built-in demonstration instead (``fastlb.demo``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable, Optional, Sequence

from fastlb import __version__, bridge
from fastlb.settings import SETTINGS, Config, SettingError, backend, port, resolve

log = logging.getLogger("fastlb")

USAGE = "fastlb [-N THREADS] [-R REQUESTS] [options] LB_PORT SERVER [SERVER ...]\n       fastlb demo"

DESCRIPTION = """\
Accept TCP connections on LB_PORT and relay each, byte for byte, to the healthy
backend SERVER with the fewest entries (then fewest errors, then the earliest
given).  Backends are probed with GET /healthcheck, which must answer 200 with
the body "<errors>\\n<entries>".  A SERVER is PORT (meaning 127.0.0.1:PORT) or
HOST:PORT; options may appear anywhere among the positionals."""

EPILOG = """\
`fastlb demo` starts three built-in backends and a balancer, sends traffic,
kills one backend half-way and shows how fastlb routes around it.
Environment: FASTLB_NO_EXTENSIONS=1 forces the pure-Python relay."""


def _argparse_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Turn a settings parser into an argparse type whose errors read as one clear line."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlb", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("port", metavar="LB_PORT", type=_argparse_type(port),
                        help="port to accept client connections on")
    parser.add_argument("servers", metavar="SERVER", nargs="+", type=_argparse_type(backend),
                        help="backend as PORT or HOST:PORT; the same backend may be given twice")
    for setting in SETTINGS:
        parser.add_argument(
            *setting.flags, dest=setting.name, type=_argparse_type(setting.parse),
            default=setting.default, metavar=setting.metavar or None,
            help="%s (default: %s)" % (setting.help, setting.default),
        )
    parser.add_argument("--version", action="version",
                        version="fastlb %s (bridge: %s)" % (__version__, bridge.IMPLEMENTATION))
    return parser


def parse_config(argv: Sequence[str]) -> Config:
    """Parse a command line into a Config; exits with status 2 and a one-line reason on error."""
    parser = build_parser()
    args = parser.parse_intermixed_args(list(argv))
    try:
        backends = [resolve(address) for address in args.servers]
    except SettingError as exc:
        parser.error(str(exc))
    values = {setting.name: getattr(args, setting.name) for setting in SETTINGS}
    return Config(port=args.port, backends=backends, **values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from fastlb.demo import main as demo_main

        return demo_main(argv[1:])

    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s fastlb[%(process)d] %(levelname)s %(message)s",
    )

    from fastlb.balancer import Balancer, ListenError

    balancer = Balancer(config)
    try:
        balancer.bind()
    except ListenError as exc:
        print("fastlb: %s" % exc, file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        if balancer.stopping:
            # The operator insists: no more draining.
            os.write(2, b"fastlb: second signal, exiting at once\n")
            os._exit(1)
        log.info("%s received: no longer accepting, draining (send it again to exit at once)",
                 signal.Signals(signum).name)
        balancer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    balancer.run()
    return 0
