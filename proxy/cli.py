"""Entry points: `faultline serve | demo | check-config`.

Rule: a user error (bad configuration, busy port) is one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import Config, ConfigError, describe_interface, format_address, load_config
from .config_routes import parse_cli_route
from .telemetry.logoutput import stderr_stream

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
    serve.add_argument(
        "--upstream", help="http://, https:// or h2c:// (HTTP/2) origin (FAULTLINE_UPSTREAM)"
    )
    serve.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        help="proxy address, default 0.0.0.0:8080; a bare port (--listen 8080) binds all "
        "interfaces, 0.0.0.0; 127.0.0.1:8080 is this machine only (FAULTLINE_LISTEN)",
    )
    serve.add_argument(
        "--admin",
        metavar="[HOST:]PORT",
        help="admin address, default 127.0.0.1:9901; a bare port (--admin 9901) binds "
        "127.0.0.1, this machine only (FAULTLINE_ADMIN)",
    )
    serve.add_argument(
        "--route",
        action="append",
        metavar="[NAME=]PREFIX=URL",
        help="a route, repeatable, first match wins: requests under PREFIX go to URL "
        "(e.g. api=/api/=http://127.0.0.1:8000); --upstream stays the default route "
        "(FAULTLINE_ROUTES: YAML or JSON)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="serving processes sharing the listen port, default 1; one admin server merges "
        "their counts (FAULTLINE_WORKERS)",
    )
    serve.add_argument(
        "--tls-cert", metavar="FILE", help="TLS on the listen port: certificate chain (PEM)"
    )
    serve.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    _add_common(serve)

    demo = sub.add_parser(
        "demo", help="run a demo origin that fails on request, with the proxy in front"
    )
    demo.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        default="127.0.0.1:8080",
        help="proxy address (default 127.0.0.1:8080; a bare port binds 127.0.0.1, this "
        "machine only)",
    )
    demo.add_argument(
        "--admin",
        metavar="[HOST:]PORT",
        default="127.0.0.1:9901",
        help="admin address (default 127.0.0.1:9901; a bare port binds 127.0.0.1)",
    )
    demo.add_argument(
        "--origin",
        metavar="[HOST:]PORT",
        default="127.0.0.1:0",
        help="demo origin address (default: a free port on 127.0.0.1; a bare port binds 127.0.0.1)",
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
        ("workers",): getattr(args, "workers", None),
        ("routes",): _cli_routes(getattr(args, "route", None)),
        ("tls", "cert"): getattr(args, "tls_cert", None),
        ("tls", "key"): getattr(args, "tls_key", None),
        ("listen",): args.listen,
        ("admin", "listen"): args.admin,
        ("log", "format"): args.log_format,
        ("log", "quiet"): args.quiet,
    }


def _cli_routes(given: list[str] | None) -> list[dict[str, Any]] | None:
    if not given:
        return None
    try:
        return [parse_cli_route(text) for text in given]
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None


def route_table(config: Config) -> list[str]:
    """The routes in the order they are tried, one line each (check-config, the banner)."""
    rows = [(r.name, r.describe(), r.upstream, r.strip_prefix) for r in config.routes]
    if config.upstream:
        rows.append(("default", "every other request", config.upstream, False))
    elif not any(r.host is None and not r.prefix for r in config.routes):
        rows.append(("(none)", "every other request", "404 destination_not_found", False))
    width = max(len(name) for name, *_ in rows)
    match = max(len(describe) for _, describe, *_ in rows)
    return [
        f"{name:<{width}}  {describe:<{match}}  -> {upstream}"
        + ("  (prefix stripped)" if strip else "")
        for name, describe, upstream, strip in rows
    ]


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
        stream=stderr_stream(),
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
    """The file with the FAULTLINE_* environment applied: what `serve` would run with."""
    env = {k: v for k, v in os.environ.items() if k != "FAULTLINE_CONFIG"}
    config = load_config(file, env=env)
    try:
        yaml.safe_dump(config.effective(), sys.stdout, sort_keys=False)
        if config.routes:
            print("# routes, first match wins:")
            for line in route_table(config):
                print(f"#   {line}")
        sys.stdout.flush()
    except BrokenPipeError:  # `faultline check-config FILE | head`: fine, not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(config: Config, banner: Any) -> int:
    import uvloop

    from .server import StartupError, run

    if config.workers > 1:
        from .supervisor import run as supervise

        run = supervise  # type: ignore[assignment]
    try:
        uvloop.run(run(config, banner))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


# The demo's own defaults: short timeouts so slow routes fail within a click.
DEMO_BASE: dict[tuple[str, ...], Any] = {
    ("timeouts", "response_headers"): "2s",
    ("timeouts", "upstream_read"): "2s",
    ("timeouts", "drain"): "1s",
    ("proxy_name",): "faultline-demo",
}


def _serve_banner(server: Any) -> None:
    from .telemetry.console import install_summary

    config = server.config
    workers = ""
    if config.workers > 1:
        pids = ", ".join(str(slot.pid) for slot in server.slots)
        workers = f" · {config.workers} workers (pids {pids})"
    else:  # on a terminal: a summary line after each burst (one process's: not with workers)
        install_summary(server.telemetry)
    build = "compiled" if compiled() else "interpreted"
    stale = stale_compiled()
    if stale:
        _tell(
            f"faultline: WARNING: {', '.join(stale)} changed after being compiled: the old "
            "compiled code runs. Rebuild (FAULTLINE_COMPILE=1 pip install -e .) or remove "
            "proxy/*.so."
        )
    target = f"{len(config.routes)} routes" if config.routes else config.upstream
    _tell(
        f"faultline {__version__} ({build}): "
        f"proxy listening on {_bound(server.listen_address)} -> {target} · "
        f"admin on {_bound(server.admin_address)}: /stats, /metrics, /dashboard{workers}"
    )
    if config.routes:
        _tell("\n".join(f"  {line}" for line in route_table(config)))


def _tell(text: str) -> None:
    """A banner line on stderr, written as the log is (never waiting for its reader)."""
    stderr_stream().write(text + "\n")


def _bound(address: tuple[str, int]) -> str:
    """`0.0.0.0:8080 (all interfaces)`: the address a listener bound, and who can reach it."""
    return f"{format_address(address)} ({describe_interface(address[0])})"


def _this_machine(address: str) -> str:
    """The demo binds this machine only: a bare port (`8080`) is 127.0.0.1's."""
    return f"127.0.0.1:{address.strip()}" if address.strip().isdigit() else address


def _run_demo(args: argparse.Namespace) -> int:
    """The demo origin on a free port, the proxy in front, until Ctrl-C."""
    import uvloop

    from .config import parse_address
    from .demo import start_demo_api, start_demo_origin
    from .server import ProxyServer, StartupError
    from .telemetry.console import install_summary

    args.listen, args.admin = _this_machine(args.listen), _this_machine(args.admin)
    try:
        origin_host, origin_port = parse_address(args.origin, "127.0.0.1")
    except ValueError as exc:
        return _fail(f"config error: --origin: {exc}")

    async def demo() -> None:
        try:
            origin = await start_demo_origin(origin_host, origin_port)
        except OSError as exc:
            raise StartupError(
                f"cannot start the demo origin on {args.origin}: {exc.strerror or exc}"
            ) from None
        try:
            api = await start_demo_api(origin_host, 0)
        except OSError as exc:
            await origin.close()
            raise StartupError(f"cannot start the demo API: {exc.strerror or exc}") from None
        try:
            # Two routes: /api/ to the demo API, everything else to the demo origin's pages.
            routes = [
                {"name": "api", "path_prefix": "/api/", "upstream": api.url},
                {"name": "pages", "path_prefix": "/", "upstream": origin.url},
            ]
            flags = {**_flags(args), ("routes",): routes}
            config = load_config(args.config, flags=flags, base=DEMO_BASE)
            server = ProxyServer(config)
            await server.start()
            server.install_signal_handlers()
            assert server.telemetry is not None
            install_summary(server.telemetry)
            _demo_banner(server, origin.url, api.url)
            await server.serve_until_stopped()
        finally:
            await api.close()
            await origin.close()

    try:
        uvloop.run(demo())
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def _demo_banner(server: Any, origin_url: str, api_url: str) -> None:
    proxy_url = f"http://{format_address(server.listen_address)}"
    admin_url = f"http://{format_address(server.admin_address)}"
    _tell(
        f"\nFaultline {__version__} demo, listening on {_bound(server.listen_address)}\n"
        f"  proxy      {proxy_url}/   <- open this: the demo app, through the proxy\n"
        f"  origin     {origin_url}/   (the demo app itself, no proxy: route pages, /)\n"
        f"  api        {api_url}/api/users   (a second upstream: route api, /api/)\n"
        f"  dashboard  {admin_url}/dashboard\n"
        f"Try this:  curl -i {proxy_url}/reset   and read Proxy-Status and the log line.\n"
        f"Ctrl-C stops both.\n"
    )


def compiled() -> bool:
    """True when the per-exchange modules run compiled by mypyc (setup.py, FAULTLINE_COMPILE=1),
    False when they run as the interpreted sources."""
    from .forward import forwarder

    return not (forwarder.__file__ or "").endswith(".py")


def stale_compiled() -> list[str]:
    """Sources edited after their compiled copy was built next to them in a work tree
    (`FAULTLINE_COMPILE=1 pip install -e .`): Python imports the copy, so the edit does not
    run. An installed wheel's files are never edited and are not checked."""
    here = Path(__file__).resolve().parent  # the package: this module sits at its top
    paths = sysconfig.get_paths()
    if any(here.is_relative_to(Path(paths[k]).resolve()) for k in ("purelib", "platlib")):
        return []
    stale = []
    for library in here.rglob("*.so"):
        source = library.parent / (library.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > library.stat().st_mtime:
            stale.append(str(source.relative_to(here)))
    return sorted(stale)
