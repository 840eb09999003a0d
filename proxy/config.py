"""The configuration tree: YAML file + FAULTLINE_* environment twins + flags, validated once.

Rules: precedence is flag > environment > file > built-in default. Every leaf key has an
environment twin, `FAULTLINE_` + the upper-cased key path joined by `_`. The tree is frozen
and built once at start-up; nothing reads the environment at request time. A bad value
raises `ConfigError` whose message names the key (and where the value came from); an unknown
key, or a FAULTLINE_* variable that is no key's twin, names the nearest known one. An
address may be a bare port: `listen` then binds 0.0.0.0, `admin.listen` 127.0.0.1.

This module owns the keys (the sections below, their defaults, the environment twins) and
the loading; `config_parse` owns each leaf type (its parser, a `Parse` marker in
`Annotated[...]`) and the wording of the error lines; callers keep importing from here. The
given values pass through their parsers first; msgspec then checks the structure (unknown
keys), the types (numbers from strings) and the `Meta` constraints. msgspec rather than
pydantic: the same job for ~1.4 MB of RSS instead of ~9 MB (issue #6).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from .config_parse import (
    ALL_INTERFACES,
    THIS_MACHINE,
    Address,
    AdminAddress,
    Duration,
    Flag,
    Networks,
    NonNegativeInt,
    Parse,
    PositiveInt,
    ProxyName,
    StrList,
    UpstreamURL,
    error_line,
    explain,
    format_address,
    nearest,
)

# `name as name`: re-exported; the CLI and the tests import these from proxy.config.
from .config_parse import describe_interface as describe_interface
from .config_parse import parse_address as parse_address
from .config_parse import parse_duration as parse_duration
from .config_routes import ROUTES_PARSE, RouteConfig, covers

ENV_PREFIX = "FAULTLINE_"
DEFAULT_UPSTREAM = "http://127.0.0.1:3000"


class ConfigError(Exception):
    """The configuration is unusable; the message is one line naming the key or address."""


# -- the tree -------------------------------------------------------------------------------


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


def _section(cls: type) -> Any:
    return msgspec.field(default_factory=cls)


class AdminConfig(_Section, frozen=True):
    listen: AdminAddress = (THIS_MACHINE, 9901)
    token: str | None = None


class TimeoutsConfig(_Section, frozen=True):
    connect: Duration = 5.0
    response_headers: Duration = 60.0
    upstream_read: Duration = 60.0
    client_headers: Duration = 10.0
    client_body: Duration = 60.0
    keepalive: Duration = 75.0
    drain: Duration = 20.0
    shutdown_delay: Duration = 0.0
    dns: Duration = 5.0
    pool_wait: Duration = 5.0


class LimitsConfig(_Section, frozen=True):
    max_in_flight: PositiveInt = 1024
    max_connections: PositiveInt = 10000
    max_request_header_bytes: PositiveInt = 32768
    max_request_body_bytes: NonNegativeInt = 0
    max_response_header_bytes: PositiveInt = 65536


class PoolConfig(_Section, frozen=True):
    max_connections: PositiveInt = 512
    # As many as may be busy: HTTP/2 clients fan hundreds of streams out to an HTTP/1.1
    # origin, and at 128 a third of them reconnected (bench/RESULTS.md, issue 19).
    max_idle: NonNegativeInt = 512
    idle_timeout: Duration = 30.0


class TLSConfig(_Section, frozen=True):
    cert: str | None = None  # the listen port's certificate chain (PEM): TLS, ALPN h2/http1.1
    key: str | None = None  # its private key (PEM)
    verify: Flag = True
    ca_file: str | None = None
    server_name: str | None = None


class HeadersConfig(_Section, frozen=True):
    proxy_status: Flag = True
    server_timing: Flag = True
    forwarded: Flag = True
    via: Flag = True


class LogConfig(_Section, frozen=True):
    format: Literal["auto", "json", "pretty"] = "auto"
    access: Flag = True
    quiet: Flag = False
    redact_query: StrList = msgspec.field(
        default_factory=lambda: [
            "token",
            "access_token",
            "api_key",
            "apikey",
            "key",
            "password",
            "secret",
            "signature",
            "sig",
            "code",
        ]
    )


class StatsConfig(_Section, frozen=True):
    recent_errors: PositiveInt = 100


class Config(_Section, frozen=True):
    listen: Address = (ALL_INTERFACES, 8080)
    upstream: UpstreamURL = DEFAULT_UPSTREAM  # "": none (routes, and no upstream given)
    workers: PositiveInt = 1
    routes: Annotated[list[RouteConfig], ROUTES_PARSE] = msgspec.field(default_factory=list)
    proxy_name: ProxyName = "faultline"
    upstream_wait: Duration = 0.0
    diagnostics: Flag = True
    trusted_proxies: Networks = msgspec.field(default_factory=list)
    admin: AdminConfig = _section(AdminConfig)
    timeouts: TimeoutsConfig = _section(TimeoutsConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    pool: PoolConfig = _section(PoolConfig)
    tls: TLSConfig = _section(TLSConfig)
    headers: HeadersConfig = _section(HeadersConfig)
    log: LogConfig = _section(LogConfig)
    stats: StatsConfig = _section(StatsConfig)

    # -- derived facts -------------------------------------------------------------------

    @property
    def upstream_scheme(self) -> str:
        return self.upstream.split("://", 1)[0]

    @property
    def upstream_host(self) -> str:
        host = urlsplit(self.upstream).hostname
        assert host is not None
        return host

    @property
    def upstream_port(self) -> int:
        port = urlsplit(self.upstream).port
        assert port is not None
        return port

    @property
    def upstream_authority(self) -> str:
        """host:port as used in Host and next-hop."""
        return self.upstream.split("://", 1)[1]

    def effective(self) -> dict[str, Any]:
        """The configuration as plain data, addresses as HOST:PORT, the admin token hidden."""
        data = msgspec.to_builtins(self)
        data["upstream"] = self.upstream or None
        data["listen"] = format_address(self.listen)
        data["admin"]["listen"] = format_address(self.admin.listen)
        if data["admin"]["token"]:
            data["admin"]["token"] = "<set>"
        return data


# -- loading -----------------------------------------------------------------------------------


def _leaves(struct: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf key path of the tree -> its annotation."""
    out: dict[tuple[str, ...], Any] = {}
    for field in msgspec.structs.fields(struct):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            out.update(_leaves(field.type, (*prefix, field.name)))
        else:
            out[(*prefix, field.name)] = field.type
    return out


LEAF_KEYS = _leaves(Config)
_PARSERS = {
    path: mark.fn
    for path, annotation in LEAF_KEYS.items()
    for mark in getattr(annotation, "__metadata__", ())
    if isinstance(mark, Parse)
}

# Flags whose environment twin is not the key path (CONTRACT: FAULTLINE_ADMIN for --admin).
FLAG_TWINS: dict[str, tuple[str, ...]] = {
    "FAULTLINE_ADMIN": ("admin", "listen"),
}


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


# FAULTLINE_* variables that are not configuration: the build's and the test suite's, and
# those Kubernetes makes for a Service named `faultline` (FAULTLINE_SERVICE_HOST,
# FAULTLINE_PORT_8080_TCP_ADDR, ...). Any other unknown FAULTLINE_* variable is a mistake.
NOT_CONFIG_ENV = frozenset(
    {
        "FAULTLINE_CONFIG",
        "FAULTLINE_COMPILE",
        "FAULTLINE_EXPECT_COMPILED",
        "FAULTLINE_REQUIRE_TOOLS",
    }
)
_SERVICE_LINK = re.compile(
    r"FAULTLINE_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)
KNOWN_ENV: dict[str, tuple[str, ...]] = {
    **{env_name(path): path for path in LEAF_KEYS},
    **FLAG_TWINS,
}


def _sections(struct: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for field in msgspec.structs.fields(struct):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            out.append((*prefix, field.name))
            out.extend(_sections(field.type, (*prefix, field.name)))
    return out


KNOWN_KEYS: tuple[str, ...] = tuple(".".join(path) for path in (*LEAF_KEYS, *_sections(Config)))


def _env_as_key(name: str) -> str:
    """FAULTLINE_TIMEOUTS_CONNECT -> timeouts.connect (`_` inside a key becomes `.` too:
    names are compared this way, both sides alike)."""
    return name.removeprefix(ENV_PREFIX).lower().replace("_", ".")


def _unknown_env(env: Mapping[str, str]) -> str | None:
    """The first FAULTLINE_* variable that configures nothing, as an error line."""
    for name in sorted(env):
        if (
            not name.startswith(ENV_PREFIX)
            or name in KNOWN_ENV
            or name in NOT_CONFIG_ENV
            or _SERVICE_LINK.fullmatch(name)
        ):
            continue
        text = f"config error: unknown environment variable {name!r}"
        as_keys = {_env_as_key(known): known for known in KNOWN_ENV}
        near = nearest(_env_as_key(name), as_keys)
        guess = None if near is None else as_keys[near]
        if guess is not None:
            text += f": did you mean {guess!r} ({'.'.join(KNOWN_ENV[guess])})?"
        return text
    return None


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path}:{line} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    return data


def load_config(
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[tuple[str, ...], Any] | None = None,
    base: Mapping[tuple[str, ...], Any] | None = None,
) -> Config:
    """Build the one validated configuration tree (flag > env > file > base > default).

    `base` replaces built-in defaults for one use (the demo's short timeouts).
    """
    env = os.environ if env is None else env
    if unknown := _unknown_env(env):
        raise ConfigError(unknown)
    origin: dict[tuple[str, ...], str] = {}
    raw: dict[str, Any] = {}
    for path, value in (base or {}).items():
        _set(raw, path, value)
    file = file or env.get("FAULTLINE_CONFIG") or None
    if file:
        from_file = _read_file(file)
        _mark_origin(from_file, (), f"in {file}", origin)
        _merge(raw, from_file)
    for name, path in FLAG_TWINS.items():
        if name in env:
            _set(raw, path, env[name])
            origin[path] = f"from {name}"
    for path in LEAF_KEYS:
        name = env_name(path)
        if name in env:
            _set(raw, path, env[name])
            origin[path] = f"from {name}"
    for path, value in (flags or {}).items():
        if value is not None:
            _set(raw, path, value)
            origin[path] = "from the command line"
    return build_config(raw, origin)


def build_config(
    raw: Mapping[str, Any], origin: Mapping[tuple[str, ...], str] | None = None
) -> Config:
    """The validated tree from plain nested mappings; `origin` says where each leaf came from."""
    origin = origin or {}
    data = _parse_leaves(raw, (), origin)
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain(str(exc), data, origin, LEAF_KEYS, KNOWN_KEYS)) from None
    if config.routes and "upstream" not in raw:  # with routes, upstream is optional
        config = msgspec.structs.replace(config, upstream="")
    _check_default_route(config, origin)
    if (config.tls.cert is None) != (config.tls.key is None):
        given, missing = ("cert", "key") if config.tls.key is None else ("key", "cert")
        raise ConfigError(
            f"tls.{given} is set but tls.{missing} is not: TLS on the listen port needs both "
            "(--tls-cert and --tls-key)"
        )
    return config


def _check_default_route(config: Config, origin: Mapping[tuple[str, ...], str]) -> None:
    """With routes, `upstream` is the last route: an error when a route catches everything."""
    if not config.upstream:
        return
    everything = RouteConfig(name="default", upstream=config.upstream)
    for i, route in enumerate(config.routes):
        if covers(route, everything):
            where = origin.get(("upstream",))
            raise ConfigError(
                f"config error: upstream {config.upstream} is never used: routes[{i}] "
                f"({route.name}) matches every request; drop upstream or narrow the route"
                + (f" (upstream {where})" if where else "")
            )


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _mark_origin(tree: Any, prefix: tuple[str, ...], where: str, out: dict) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _mark_origin(value, (*prefix, str(key)), where, out)
    else:
        out[prefix] = where


def _parse_leaves(tree: Mapping[str, Any], prefix: tuple[str, ...], origin: Mapping) -> dict:
    """A copy of the tree with every leaf that has a parser parsed (the given tree is kept)."""
    out: dict[str, Any] = {}
    for given, value in tree.items():
        key = str(given)  # a YAML key such as `1:` or `yes:` is an unknown key, not a crash
        path = (*prefix, key)
        parser = _PARSERS.get(path)
        if parser is not None:
            try:
                value = parser(value)
            except ValueError as exc:
                raise ConfigError(error_line(path, str(exc), origin, KNOWN_KEYS)) from None
        elif isinstance(value, dict):
            value = _parse_leaves(value, path, origin)
        out[key] = value
    return out
