"""Entry points: `faultline serve | demo | check-config`.

Rule: a user error (bad configuration, busy port) is one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from . import __version__
from .config import Config, ConfigError, format_address, load_config

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faultline",
        description="A reverse proxy that says who produced every response and where the "
        "fault lies.",
    )
    parser.add_argument("--version", action="version", version=f"faultline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy in front of one upstream")
    serve.add_argument("--upstream", help="http:// or https:// origin (FAULTLINE_UPSTREAM)")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="proxy address, default 0.0.0.0:8080 (FAULTLINE_LISTEN)",
    )
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin address, default 127.0.0.1:9901 (FAULTLINE_ADMIN)",
    )
    _add_common(serve)

    demo = sub.add_parser(
        "demo", help="run a demo origin that fails on request, with the proxy in front"
    )
    demo.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:8080",
        help="proxy address (default 127.0.0.1:8080)",
    )
    demo.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default="127.0.0.1:9901",
        help="admin address (default 127.0.0.1:9901)",
    )
    demo.add_argument(
        "--origin",
        metavar="HOST:PORT",
        default="127.0.0.1:0",
        help="demo origin address (default: a free port on 127.0.0.1)",
    )
    _add_common(demo)

    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective configuration"
    )
    check.add_argument("file")
    return parser


def _add_common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", metavar="FILE", help="YAML config file (FAULTLINE_CONFIG)")
    sub.add_argument(
        "--log-format",
        choices=("auto", "json", "pretty"),
        help="access log format (default auto: pretty on a terminal)",
    )
    sub.add_argument("--quiet", action="store_true", default=None, help="no access log lines")


def _flags(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    return {
        ("upstream",): getattr(args, "upstream", None),
        ("listen",): args.listen,
        ("admin", "listen"): args.admin,
        ("log", "format"): args.log_format,
        ("log", "quiet"): args.quiet,
    }


def _fail(message: str) -> int:
    print(f"faultline: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "check-config":
            return check_config(args.file)
        if args.command == "serve":
            config = load_config(args.config, flags=_flags(args))
            return _run(config, _serve_banner)
        if args.command == "demo":
            return _run_demo(args)
    except ConfigError as exc:
        return _fail(str(exc))
    return EXIT_USAGE


def check_config(file: str) -> int:
    config = load_config(file, env={})
    yaml.safe_dump(config.effective(), sys.stdout, sort_keys=False)
    return 0


def _run(config: Config, banner: Any) -> int:
    import uvloop

    from .server import StartupError, run

    try:
        uvloop.run(run(config, banner))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def _serve_banner(server: Any) -> None:
    config = server.config
    print(
        f"faultline {__version__}: proxy http://{format_address(server.listen_address)} -> "
        f"{config.upstream} · admin http://{format_address(server.admin_address)} "
        f"(/stats, /metrics, /dashboard)",
        file=sys.stderr,
        flush=True,
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo_cli import run_demo

    return run_demo(args, _flags(args))
