"""The `routes` key: several upstreams behind one port, first match wins (issue 21).

A route matches on a path prefix (on a segment boundary: `/api` and `/api/` both match
`/api`, `/api/x` and `/api?q`, never `/apix`) and/or a Host (exact, or `*.example`: any
name under it); with neither it matches every request. Per route: `upstream` (any scheme
the proxy speaks), `strip_prefix`, `timeouts` (the upstream ones), `upstream_wait`,
`proxy_name`; what a route leaves out is the top level's.

Given as YAML or JSON (a file's `routes:` list, or `FAULTLINE_ROUTES`), or by the CLI as
`[NAME=]PREFIX=URL`. Rules: every error names the route (`routes[1] (api)`) and the key;
a route that can never match, because an earlier one matches every request it would, is an
error (it is a mistake in the order), not a silent dead entry.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import yaml

from .config_parse import Parse, parse_bool, parse_duration, parse_token, parse_upstream

# The upstream-side timeouts a route may set; the client-side ones (client_headers,
# keepalive, drain, ...) run before any route is chosen.
ROUTE_TIMEOUTS = ("connect", "dns", "response_headers", "upstream_read", "pool_wait")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_KEYS = (
    "name",
    "path_prefix",
    "host",
    "upstream",
    "strip_prefix",
    "timeouts",
    "upstream_wait",
    "proxy_name",
)


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    upstream: str
    path_prefix: str | None = None
    host: str | None = None
    strip_prefix: bool = False
    timeouts: dict[str, float] = msgspec.field(default_factory=dict)
    upstream_wait: float | None = None
    proxy_name: str | None = None

    @property
    def prefix(self) -> str | None:
        """The path prefix as matched: no trailing slash (`/` is "")."""
        return None if self.path_prefix is None else self.path_prefix.rstrip("/")

    def describe(self) -> str:
        """`host auth.localhost, path /api/`: what it matches, for messages and tables."""
        parts = []
        if self.host is not None:
            parts.append(f"host {self.host}")
        if self.path_prefix is not None:
            parts.append(f"path {self.path_prefix}")
        return ", ".join(parts) or "every request"


def _host_covers(outer: str | None, inner: str | None) -> bool:
    if outer is None or outer == inner:
        return True
    if inner is None or not outer.startswith("*."):
        return False
    suffix = outer[1:]  # ".example"
    return inner.endswith(suffix) and len(inner) > len(suffix)


def _prefix_covers(outer: str | None, inner: str | None) -> bool:
    if outer is None or outer == "":
        return True
    if inner is None:
        return False
    return inner == outer or inner.startswith(outer + "/")


def covers(outer: RouteConfig, inner: RouteConfig) -> bool:
    """Whether every request `inner` matches is matched by `outer` too."""
    return _host_covers(outer.host, inner.host) and _prefix_covers(outer.prefix, inner.prefix)


def _route(value: Any, index: int, names: set[str]) -> RouteConfig:
    where = f"routes[{index}]"
    if not isinstance(value, dict):
        raise ValueError(
            f"{where}: expected a mapping such as {{name: api, path_prefix: /api/, "
            f"upstream: http://127.0.0.1:8000}}, got {value!r}"
        )
    name = value.get("name")
    if name is not None:
        where += f" ({name})"
    for key in value:
        if key not in _KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (a route takes: {', '.join(_KEYS)})")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}: name {name!r}: use letters, digits, - _ . (at most 64)")
    if name in names:
        raise ValueError(f"{where}: name {name!r} is given twice")
    names.add(name)
    out: dict[str, Any] = {"name": name}
    try:
        if "upstream" not in value:
            raise ValueError("upstream: missing (e.g. http://127.0.0.1:8000)")
        out["upstream"] = parse_upstream(value["upstream"])
        prefix = value.get("path_prefix")
        if prefix is not None:
            if not isinstance(prefix, str) or not prefix.startswith("/") or "?" in prefix:
                raise ValueError(f"path_prefix {prefix!r}: a path starting with /, e.g. /api/")
            out["path_prefix"] = prefix
        host = value.get("host")
        if host is not None:
            host = str(host).strip().lower()
            if not _HOST.fullmatch(host):
                raise ValueError(f"host {host!r}: a name (auth.localhost) or *.suffix")
            out["host"] = host
        if "strip_prefix" in value:
            out["strip_prefix"] = parse_bool(value["strip_prefix"])
            if out["strip_prefix"] and prefix is None:
                raise ValueError("strip_prefix: needs a path_prefix to strip")
        timeouts = value.get("timeouts") or {}
        if not isinstance(timeouts, dict):
            raise ValueError(f"timeouts: expected a mapping, got {timeouts!r}")
        for key, given in timeouts.items():
            if key not in ROUTE_TIMEOUTS:
                raise ValueError(
                    f"timeouts.{key}: a route sets only {', '.join(ROUTE_TIMEOUTS)} "
                    "(the others apply before a route is chosen: set them at the top level)"
                )
            out.setdefault("timeouts", {})[key] = parse_duration(given)
        if value.get("upstream_wait") is not None:
            out["upstream_wait"] = parse_duration(value["upstream_wait"])
        if value.get("proxy_name") is not None:
            out["proxy_name"] = parse_token(value["proxy_name"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return msgspec.convert(out, RouteConfig)


def parse_routes(value: Any) -> list[RouteConfig]:
    """A list of routes (or its YAML/JSON text: `FAULTLINE_ROUTES`), checked as a table."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError:
            raise ValueError("not valid YAML or JSON (give a list of routes)") from None
    if isinstance(value, RouteConfig):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of routes, got {json.dumps(value, default=str)}")
    names: set[str] = set()
    routes = [v if isinstance(v, RouteConfig) else _route(v, i, names) for i, v in enumerate(value)]
    for j, later in enumerate(routes):
        for i, earlier in enumerate(routes[:j]):
            if covers(earlier, later):
                raise ValueError(
                    f"routes[{j}] ({later.name}) can never match: routes[{i}] "
                    f"({earlier.name}, {earlier.describe()}) comes first and matches every "
                    f"request it would ({later.describe()}); put the narrower route first"
                )
    return routes


def parse_cli_route(text: str) -> dict[str, Any]:
    """`--route [NAME=]PREFIX=URL` -> a route (named after its prefix when NAME is left
    out: `/api/=...` is `api`, `/=...` is `root`)."""
    if text.startswith("/"):
        prefix, sep, url = text.partition("=")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix.strip("/")).strip("-") or "root"
    else:
        name, sep, rest = text.partition("=")
        prefix, sep, url = rest.partition("=")
    if not sep or not prefix.startswith("/") or not url:
        raise ValueError(
            f"--route {text!r}: use [NAME=]PREFIX=URL, e.g. api=/api/=http://127.0.0.1:8000"
        )
    return {"name": name, "path_prefix": prefix, "upstream": url}


Routes = Any  # list[RouteConfig], parsed by `parse_routes`
ROUTES_PARSE = Parse(parse_routes)
