"""The ``fastlb`` command: parse the command line, set up logging, run the balancer.

``fastlb demo`` runs the built-in demonstration instead (``fastlb.demo``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Optional, Sequence

from fastlb import __version__, bridge, configfile
from fastlb.settings import (SETTINGS, Config, SettingError, argparse_type, backend, port)

log = logging.getLogger("fastlb")

USAGE = ("fastlb [-N THREADS] [-R REQUESTS] [options] LB_PORT SERVER [SERVER ...]\n"
         "       fastlb --config FILE [options] [LB_PORT] [SERVER ...]\n"
         "       fastlb demo")

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlb", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # --check and its --check-* family make prefixes ambiguous; HAProxy and
        # nginx take no abbreviations either.
        allow_abbrev=False,
    )
    parser.add_argument("port", metavar="LB_PORT", type=argparse_type(port), nargs="?",
                        help="port to accept client connections on")
    parser.add_argument("servers", metavar="SERVER", nargs="*", type=argparse_type(backend),
                        help="backend as PORT or HOST:PORT; the same backend may be given twice")
    parser.add_argument("--config", metavar="FILE",
                        help="read settings and backends from a TOML file; options and "
                             "positionals on the command line override it; SIGHUP re-reads it")
    # SUPPRESS: an option absent from the command line leaves no attribute, so
    # the config file's value (or the default) shows through.
    for setting in SETTINGS:
        if setting.flag:
            parser.add_argument(*setting.flags, dest=setting.name, action="store_const",
                                const=True, default=argparse.SUPPRESS,
                                help="%s (default: %s)" % (setting.help, setting.shown_default))
            continue
        parser.add_argument(
            *setting.flags, dest=setting.name, type=argparse_type(setting.parse),
            default=argparse.SUPPRESS, metavar=setting.metavar or None,
            help="%s (default: %s)" % (setting.help, setting.shown_default),
        )
    parser.add_argument("--version", action="version",
                        version="fastlb %s (bridge: %s)" % (__version__, bridge.IMPLEMENTATION))
    return parser


def _reject_unknown_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Name an unknown option before argparse mistakes its value for a positional."""
    for arg in argv:
        if arg == "--":
            return
        if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit():
            continue
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if name not in parser._option_string_actions:
            parser.error("unrecognized arguments: %s (no such option)" % name)


def build_config(args: argparse.Namespace) -> Config:
    """Merge defaults, the config file and the command line; raise SettingError when invalid."""
    values = {setting.name: setting.default for setting in SETTINGS}
    if args.config:
        values.update(configfile.load(args.config))
    values.update({s.name: getattr(args, s.name) for s in SETTINGS if hasattr(args, s.name)})
    if args.port is not None:
        values["port"] = args.port
    if args.servers:
        values["backends"] = args.servers
    missing = [name for key, name in (("port", "LB_PORT"), ("backends", "SERVER"))
               if key not in values]
    if missing:
        raise SettingError("the following arguments are required: %s" % ", ".join(missing))
    # A backend table's check settings are judged only once merged with the
    # global ones: name the file's line like every file error.
    where = configfile.location(args.config, "backends") if args.config and not args.servers else ""
    return configfile.complete(values, where)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Config]:
    """Parse a command line; exits with status 2 and a one-line reason on error."""
    parser = build_parser()
    _reject_unknown_options(parser, argv)
    args = parser.parse_intermixed_args(list(argv))
    try:
        return args, build_config(args)
    except SettingError as exc:
        parser.error(str(exc))


def parse_config(argv: Sequence[str]) -> Config:
    return parse_args(argv)[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from fastlb.demo import main as demo_main

        return demo_main(argv[1:])

    args, config = parse_args(argv)
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

    if args.config:
        # What SIGHUP re-reads: the file, under the command line's overrides.
        balancer.config_source = lambda: build_config(args)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, balancer.signal_received)
    # The kernel may deliver a signal to any thread, while Python runs its
    # handlers only in this one: the wakeup fd gets the accept loop out of its
    # wait whichever thread was hit.
    signal.set_wakeup_fd(balancer.wakeup_fd)
    balancer.run()
    return 0
