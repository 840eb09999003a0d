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
    duration_text,
)
from proxy.exchange import Exchange, Phase
from proxy.faults import REQUEST_PROBLEMS, TAXONOMY, Fault, Layer, RequestProblem, Source
from proxy.replies import problem_document

from support import ROOT, check_detail

# CONTRACT.md's fault table as this repository implements it (tests/contract/): token ->
# (statuses, layer); an empty tuple when nothing is sent (already sent, or logged only).
CONTRACT_COPY = ROOT / "tests" / "contract" / "fault-table.md"
SHARED_CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
# Rows of the shared contract that belong to issues not done yet.
PENDING = {"destination_not_found", "proxy_configuration_error"}
# Who produced the status of each fault's exchange (CONTRACT.md: `source`): the proxy for
# what it answered itself, the origin when its response had started before the fault, the
# client when nothing was sent.
SOURCES = {
    "http_response_incomplete": "origin",
    "connection_read_timeout": "origin",
    "client_closed_request": "client",
}


def contract_rows(text: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| (\w+) \|", text, re.M)
    # "499 (logged only)": no status is sent, as for "(already sent)".
    return {
        token: (
            ()
            if "logged only" in status
            else tuple(int(s) for s in re.findall(r"\b\d{3}\b", status)),
            layer,
        )
        for token, status, layer in rows
    }


CONTRACT_TABLE = contract_rows(CONTRACT_COPY.read_text())


def test_every_fault_has_a_complete_row():
    assert set(TAXONOMY) == set(Fault)
    for fault, row in TAXONOMY.items():
        assert row.fault is fault
        assert isinstance(row.layer, Layer) and isinstance(row.source, Source)
        assert row.title and row.meaning and row.advice and row.hop
        assert row.status is None or 400 <= row.status < 600


def test_taxonomy_matches_the_contract_table():
    assert len(CONTRACT_TABLE) >= 20, "the contract's copy lost its rows"
    implemented = {t: row for t, row in CONTRACT_TABLE.items() if t not in PENDING}
    rows = [*TAXONOMY.values(), *REQUEST_PROBLEMS.values()]
    ours: dict[str, tuple[set[int], str]] = {}
    for row in rows:
        statuses, layer = ours.setdefault(row.token, (set(), row.layer.value))
        assert layer == row.layer.value, row
        if row.status is not None:
            statuses.add(row.status)
    assert {t: (tuple(sorted(s)), layer) for t, (s, layer) in ours.items()} == implemented


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.value)
def test_each_fault_is_charged_to_the_party_that_produced_the_status(fault):
    assert TAXONOMY[fault].source.value == SOURCES.get(fault.value, "proxy")


@pytest.mark.skipif(not SHARED_CONTRACT.exists(), reason="../shared/CONTRACT.md not beside")
def test_the_shared_contract_asks_nothing_the_copy_does_not_keep():
    """The copy in the repository may add (an issue's amendment) but never drop or change a
    status or a layer of the shared contract; its rows are all here, or pending."""
    shared = contract_rows(SHARED_CONTRACT.read_text())
    assert shared, "no fault table found in the shared CONTRACT.md"
    for token, (statuses, layer) in shared.items():
        if token in PENDING:
            continue
        assert token in CONTRACT_TABLE, f"{token}: in the shared contract, not in the copy"
        ours, our_layer = CONTRACT_TABLE[token]
        assert our_layer == layer and set(statuses) <= set(ours), (token, statuses, layer)


def test_request_problems_cover_400_408_413_431_501():
    statuses = {p: row.status for p, row in REQUEST_PROBLEMS.items()}
    assert statuses == {
        RequestProblem.MALFORMED: 400,
        RequestProblem.TIMEOUT: 408,
        RequestProblem.BODY_TOO_LARGE: 413,
        RequestProblem.HEADERS_TOO_LARGE: 431,
        RequestProblem.NOT_IMPLEMENTED: 501,
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


def _problem(fault: Fault, detail: str | None, problem: RequestProblem | None = None) -> dict:
    row = REQUEST_PROBLEMS[problem] if problem is not None else TAXONOMY[fault]
    return problem_document(row, Exchange(0, "127.0.0.1", "app:3000"), detail, "http://app:3000")


@pytest.mark.parametrize(
    "row",
    [r for r in [*TAXONOMY.values(), *REQUEST_PROBLEMS.values()] if r.status is not None],
    ids=lambda r: f"{r.token}-{r.status}",
)
def test_every_row_renders_one_fact_then_the_advice(row):
    """Without a detail of its own, a row's body says its meaning; the advice is apart."""
    problem = next((p for p, r in REQUEST_PROBLEMS.items() if r is row), None)
    doc = _problem(row.fault, None, problem)
    assert doc["detail"] == row.meaning and doc["check_first"] == row.advice
    check_detail(doc["detail"], row.advice)


@pytest.mark.parametrize(
    ("phase", "error", "facts", "fault"),
    CASES,
    ids=[f"{c[0].name}-{type(c[1]).__name__}-{c[3].value}" for c in CASES],
)
def test_every_classified_detail_is_one_sentence_with_its_setting(phase, error, facts, fault):
    """The body's detail is the fact as a sentence, never the row's meaning with the fact
    in brackets behind it (which said everything twice); a timeout names its value."""
    if isinstance(error, DeadlineExpired):
        error = DeadlineExpired(700_000_000, "timeouts.x")
    got, detail = classify(phase, error, **facts)
    row = TAXONOMY[got]
    check_detail(detail, row.advice, row.meaning)
    if isinstance(error, DeadlineExpired):
        assert detail.endswith("700ms (timeouts.x)"), detail
    if row.status is not None:
        text = _problem(got, detail)["detail"]
        check_detail(text, row.advice, row.meaning)
        assert text[0].isupper() and text.endswith(".") and text[:-1].lower() == detail.lower()


@pytest.mark.parametrize(
    ("ns", "text"),
    [(700_000_000, "700ms"), (5 * 10**9, "5s"), (1_500_000_000, "1.5s"), (120 * 10**9, "2m")],
)
def test_durations_read_as_configured(ns, text):
    assert duration_text(ns) == text


def test_dns_error_detail_is_the_rcode():
    assert classify(Phase.DNS, socket.gaierror(socket.EAI_NONAME, "x")) == (
        Fault.DNS_ERROR,
        "NXDOMAIN",
    )
