"""The taxonomy is complete and the only place that spells a fault token; classify maps
(phase, OS error) to the right fault."""

from __future__ import annotations

import ast
import errno
import re
import socket
import ssl
from pathlib import Path

import pytest

from proxy.classify import (
    DeadlineExpired,
    ResponseHeadersTooLarge,
    UpgradeBroken,
    UpstreamProtocolError,
    classify,
)
from proxy.exchange import Phase
from proxy.faults import REQUEST_PROBLEMS, TAXONOMY, Fault, Layer, RequestProblem, Source

from support import ROOT

# CONTRACT.md's fault table: token -> (status or None when already sent / logged only, layer)
CONTRACT_TABLE = {
    "dns_error": (502, "transport"),
    "dns_timeout": (504, "transport"),
    "connection_refused": (502, "transport"),
    "connection_timeout": (504, "transport"),
    "tls_certificate_error": (502, "transport"),
    "tls_protocol_error": (502, "transport"),
    "connection_terminated": (502, "upstream"),
    "http_protocol_error": (502, "upstream"),
    "http_response_header_section_size": (502, "upstream"),
    "http_response_timeout": (504, "upstream"),
    "http_response_incomplete": (None, "upstream"),
    "connection_read_timeout": (None, "upstream"),
    "http_upgrade_failed": (502, "upstream"),
    "connection_limit_reached": (503, "proxy"),
    "proxy_loop_detected": (502, "proxy"),
    "proxy_internal_error": (500, "proxy"),
    "http_request_error": (400, "client"),
    "client_closed_request": (None, "client"),
}
SHARED_CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"


def test_every_fault_has_a_complete_row():
    assert set(TAXONOMY) == set(Fault)
    for fault, row in TAXONOMY.items():
        assert row.fault is fault
        assert isinstance(row.layer, Layer) and isinstance(row.source, Source)
        assert row.title and row.meaning and row.advice and row.hop
        assert row.status is None or 400 <= row.status < 600


def test_taxonomy_matches_the_contract_table():
    ours = {f.value: (row.status, row.layer.value) for f, row in TAXONOMY.items()}
    assert ours == CONTRACT_TABLE


@pytest.mark.skipif(not SHARED_CONTRACT.exists(), reason="../shared/CONTRACT.md not beside")
def test_contract_table_in_this_test_is_the_shared_one():
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| (\w+) \|", SHARED_CONTRACT.read_text(), re.M)
    assert {token for token, _, _ in rows} == set(CONTRACT_TABLE)
    for token, status, layer in rows:
        expected_status, expected_layer = CONTRACT_TABLE[token]
        assert layer == expected_layer
        if expected_status is not None:
            assert str(expected_status) in status


def test_request_problems_cover_400_408_413_431():
    statuses = {p: row.status for p, row in REQUEST_PROBLEMS.items()}
    assert statuses == {
        RequestProblem.MALFORMED: 400,
        RequestProblem.TIMEOUT: 408,
        RequestProblem.BODY_TOO_LARGE: 413,
        RequestProblem.HEADERS_TOO_LARGE: 431,
    }
    for row in REQUEST_PROBLEMS.values():
        assert row.fault is Fault.HTTP_REQUEST_ERROR and row.layer is Layer.CLIENT
        assert row.title and row.advice


def _string_constants(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def test_nothing_outside_the_taxonomy_spells_a_fault_token():
    tokens = {f.value for f in Fault}
    word = re.compile(r"\b(" + "|".join(sorted(tokens, key=len, reverse=True)) + r")\b")
    offenders = []
    for path in sorted((ROOT / "proxy").rglob("*")):
        if path.name == "faults.py" or path.is_dir() or "__pycache__" in path.parts:
            continue
        if path.suffix == ".py":
            for text in _string_constants(path):
                if text in tokens or re.search(r"error=(" + "|".join(tokens) + r")\b", text):
                    offenders.append(f"{path.name}: {text!r}")
        elif path.suffix in (".html", ".js", ".css"):
            offenders += [f"{path.name}: {m}" for m in word.findall(path.read_text())]
    assert offenders == []


# -- classify ---------------------------------------------------------------------------------

CASES = [
    (Phase.DNS, socket.gaierror(socket.EAI_NONAME, "not known"), {}, Fault.DNS_ERROR),
    (Phase.DNS, socket.gaierror(socket.EAI_AGAIN, "again"), {}, Fault.DNS_TIMEOUT),
    (Phase.DNS, DeadlineExpired(), {}, Fault.DNS_TIMEOUT),
    (
        Phase.CONNECT,
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        {},
        Fault.CONNECTION_REFUSED,
    ),
    (Phase.CONNECT, DeadlineExpired(), {}, Fault.CONNECTION_TIMEOUT),
    (Phase.CONNECT, OSError(errno.ETIMEDOUT, "timed out"), {}, Fault.CONNECTION_TIMEOUT),
    (Phase.CONNECT, OSError(errno.EHOSTUNREACH, "unreachable"), {}, Fault.CONNECTION_REFUSED),
    (Phase.TLS, ssl.SSLCertVerificationError(1, "bad cert"), {}, Fault.TLS_CERTIFICATE_ERROR),
    (Phase.TLS, ssl.SSLError(1, "wrong version"), {}, Fault.TLS_PROTOCOL_ERROR),
    (Phase.TLS, ConnectionResetError(), {}, Fault.TLS_PROTOCOL_ERROR),
    (Phase.TLS, DeadlineExpired(), {}, Fault.CONNECTION_TIMEOUT),
    (Phase.SEND, None, {}, Fault.CONNECTION_TERMINATED),
    (Phase.AWAIT_HEAD, ConnectionResetError(), {}, Fault.CONNECTION_TERMINATED),
    (Phase.AWAIT_HEAD, None, {"response_bytes_seen": True}, Fault.HTTP_PROTOCOL_ERROR),
    (Phase.AWAIT_HEAD, UpstreamProtocolError("bad"), {}, Fault.HTTP_PROTOCOL_ERROR),
    (Phase.AWAIT_HEAD, ResponseHeadersTooLarge("big"), {}, Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE),
    (Phase.AWAIT_HEAD, DeadlineExpired(), {}, Fault.HTTP_RESPONSE_TIMEOUT),
    (Phase.AWAIT_HEAD, None, {"upgrade": True}, Fault.HTTP_UPGRADE_FAILED),
    (Phase.AWAIT_HEAD, UpgradeBroken("no header"), {}, Fault.HTTP_UPGRADE_FAILED),
    (Phase.BODY, None, {}, Fault.HTTP_RESPONSE_INCOMPLETE),
    (Phase.BODY, ConnectionResetError(), {}, Fault.HTTP_RESPONSE_INCOMPLETE),
    (Phase.BODY, DeadlineExpired(), {}, Fault.CONNECTION_READ_TIMEOUT),
    (Phase.BODY, UpstreamProtocolError("bad chunk"), {}, Fault.HTTP_PROTOCOL_ERROR),
    (Phase.POOL_WAIT, DeadlineExpired(), {}, Fault.CONNECTION_LIMIT_REACHED),
]


@pytest.mark.parametrize(
    ("phase", "error", "facts", "fault"),
    CASES,
    ids=[f"{c[0].name}-{type(c[1]).__name__}-{c[3].value}" for c in CASES],
)
def test_classify(phase, error, facts, fault):
    got, detail = classify(phase, error, **facts)
    assert got is fault
    assert detail and "\n" not in detail


def test_dns_error_detail_is_the_rcode():
    assert classify(Phase.DNS, socket.gaierror(socket.EAI_NONAME, "x")) == (
        Fault.DNS_ERROR,
        "NXDOMAIN",
    )
