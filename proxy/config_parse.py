"""The leaf values of the configuration tree: each type's parser, and the one-line errors.

Rules: a parser turns what a file, the environment or a flag gives (text, a number, a list)
into the plain value, or raises `ValueError` saying what is wrong and what to write instead;
it never sees the key, the source or the environment. Each leaf type is declared once here:
its parser as a `Parse` marker in `Annotated[...]`, then any `Meta` constraint msgspec checks.
An address may be a bare port: `Address` then binds 0.0.0.0, `AdminAddress` 127.0.0.1.
An error line is `config error: KEY: MESSAGE (where the value came from)`; an unknown key
names the nearest known one. This module knows no key names: `proxy.config` owns the tree
and passes its keys in (imports go one way, config -> config_parse, and nothing else from
`proxy`).
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

# -- value types -----------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`250ms`, `5s`, `2m`, `1h` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_S[match.group(2)]
    raise ValueError(f"invalid duration {value!r} (use 250ms, 5s, 2m or a number of seconds)")


ALL_INTERFACES = "0.0.0.0"
THIS_MACHINE = "127.0.0.1"


def parse_address(value: Any, default_host: str = ALL_INTERFACES) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `:port` (all interfaces) or a bare port (`8080`, which
    binds `default_host`: each address option has its own) -> (host, port)."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port = default_host, value
    elif isinstance(value, tuple | list) and len(value) == 2:
        host, port = str(value[0]), value[1]
    elif isinstance(value, str) and value.strip().isdigit():
        host, port = default_host, int(value.strip())
    elif isinstance(value, str):
        host, sep, port_text = value.strip().rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"invalid address {value!r} (use HOST:PORT or a port)")
        host, port = host.strip("[]") or ALL_INTERFACES, int(port_text)
    else:
        raise ValueError(f"invalid address {value!r} (use HOST:PORT or a port)")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_admin_address(value: Any) -> tuple[str, int]:
    """As `parse_address`; a bare port binds this machine only (the admin default)."""
    return parse_address(value, THIS_MACHINE)


def describe_interface(host: str) -> str:
    """Who can reach an address bound on `host`, in a few words for the start-up line."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return "this name's addresses only"
    if ip.is_unspecified:
        return "all interfaces"
    if ip.is_loopback:
        return "this machine only"
    return "this address only"


def parse_upstream(value: Any) -> str:
    """An http://, https:// or h2c:// (HTTP/2 with prior knowledge) origin, host[:port]
    only (no path, query or credentials)."""
    if not isinstance(value, str):
        raise ValueError(f"invalid upstream {value!r}")
    text = value.strip()
    if "://" not in text:
        raise ValueError(f"invalid upstream {value!r}: give a URL such as http://127.0.0.1:3000")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https", "h2c"):
        raise ValueError(f"invalid upstream {value!r}: scheme must be http, https or h2c")
    if not parts.hostname:
        raise ValueError(f"invalid upstream {value!r}: no host")
    if parts.username or parts.password:
        raise ValueError("invalid upstream: credentials in the URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid upstream {value!r}: only scheme://host[:port] is supported")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid upstream {value!r}: bad port") from exc
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port or (443 if parts.scheme == 'https' else 80)}"


def parse_token(value: Any) -> str:
    """A Proxy-Status member name must be an sf-token (RFC 8941)."""
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z*][A-Za-z0-9_\-.:%*/!#$&'+^`|~]*", value
    ):
        raise ValueError(f"invalid proxy name {value!r}: use letters, digits, - _ . :")
    return value


def parse_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    raise ValueError(f"expected a list, got {value!r}")


def parse_networks(value: Any) -> list[str]:
    items = parse_list(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid network {item!r} (use an address or a CIDR)") from exc
    return items


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def parse_bool(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 in any case (environment values are strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    raise ValueError(f"invalid boolean {value!r} (use true or false)")


def _integer_text(value: Any) -> Any:
    """Number text as a number (`' 10 '`, `+5`, `1_000`); msgspec checks everything else."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    return value


class Parse:
    """`Annotated[...]` marker: the leaf's given value passes through `fn` first."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn


Duration = Annotated[float, Parse(parse_duration)]
Address = Annotated[tuple[str, int], Parse(parse_address)]
AdminAddress = Annotated[tuple[str, int], Parse(parse_admin_address)]
UpstreamURL = Annotated[str, Parse(parse_upstream)]
ProxyName = Annotated[str, Parse(parse_token)]
Flag = Annotated[bool, Parse(parse_bool)]
StrList = Annotated[list[str], Parse(parse_list)]
Networks = Annotated[list[str], Parse(parse_networks)]
PositiveInt = Annotated[int, Parse(_integer_text), msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, Parse(_integer_text), msgspec.Meta(ge=0)]


# -- error lines -----------------------------------------------------------------------------


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a mistyped one (`upstram` -> `upstream`), if any is close;
    a key given at the wrong level (`drain` for `timeouts.drain`) is found by its last part."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_last: dict[str, str | None] = {}
    for key in known:
        last = key.rpartition(".")[2]
        by_last[last] = None if last in by_last else key  # ambiguous: no guess
    close = difflib.get_close_matches(name.rpartition(".")[2], list(by_last), n=1, cutoff=0.75)
    return by_last[close[0]] if close else None


def error_line(
    path: tuple[str, ...],
    message: str,
    origin: Mapping[tuple[str, ...], str],
    known: Iterable[str],
) -> str:
    """`config error: KEY: MESSAGE (where the value came from)`; no message: an unknown key."""
    key = ".".join(path) or "(top level)"
    where = origin.get(path) or next(
        (w for p, w in origin.items() if p[: len(path)] == path), None
    )  # an unknown section: where its first leaf came from
    if message:
        text = f"{key}: {message}"
    else:
        text = f"unknown key {key!r}"
        guess = nearest(key, known)
        if guess is not None:
            text += f": did you mean {guess!r}?"
    return f"config error: {text}" + (f" ({where})" if where else "")


_KINDS = {
    "int": "an integer",
    "str": "a string",
    "str | null": "a string",
    "object": "a mapping of keys",
    "array": "a list",
}
_EXPECTED = re.compile(r"Expected `([^`]+)`(.*?)(?:, got `[^`]+`)?")
_UNKNOWN = re.compile(r"Object contains unknown field `(.+)`")


def explain(
    text: str,
    data: Any,
    origin: Mapping[tuple[str, ...], str],
    leaves: Mapping[tuple[str, ...], Any],
    known: Iterable[str],
) -> str:
    """msgspec's `<message> - at `$.a.b`` as one line in our words, naming key and source."""
    message, _, at = text.partition(" - at `$")
    path = tuple(at.rstrip("`").split(".")[1:]) if at else ()
    if unknown := _UNKNOWN.fullmatch(message):
        path = (*path, unknown.group(1))
        return error_line(path, "", origin, known)
    value = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if get_origin(leaves.get(path)) is Literal:
        message = f"expected one of {', '.join(map(repr, get_args(leaves[path])))}"
        message += f", got {value!r}"
    elif expected := _EXPECTED.fullmatch(message):
        kind, constraint = expected.groups()
        message = f"expected {_KINDS.get(kind, kind)}{constraint}, got {value!r}"
    return error_line(path, message.replace("`", ""), origin, known)
