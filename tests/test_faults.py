"""The taxonomy is complete and the only place that spells a fault token; classify maps
(phase, OS error) to the right fault."""

from __future__ import annotations

import ast
import errno
import json
import re
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest

from proxy.diagnosis.classify import (
    DeadlineExpired,
    ResponseHeadersTooLarge,
    UpgradeBroken,
    UpstreamProtocolError,
    classify,
    duration_text,
)
from proxy.diagnosis.faults import (
    CLIENT_CLOSED_STATUS,
    REQUEST_PROBLEMS,
    TAXONOMY,
    Fault,
    Layer,
    RequestProblem,
    Source,
    info,
)
from proxy.diagnosis.record import Exchange, Phase
from proxy.forward.pool import handshake_failure, name_failure
from proxy.replies import problem_document

from support import LOOPBACK, ROOT, check_detail

# CONTRACT.md's fault table as this repository implements it (tests/contract/): token ->
# (statuses, layer); an empty tuple when nothing is sent (already sent, or logged only).
CONTRACT_COPY = ROOT / "tests" / "contract" / "fault-table.md"
SHARED_CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
# Rows of the shared contract that belong to issues not done yet.
PENDING: set[str] = set()
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


async def test_the_faults_endpoint_says_what_the_contract_says(proxy_factory):
    """/faults, what the dashboard explains each fault with, against the contract's copy
    (not against TAXONOMY, which it is made from): every status, layer and source."""
    proxy = await proxy_factory(f"http://{LOOPBACK}:9")
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/faults") as resp:
            assert resp.status == 200
            doc = await resp.json()
    served = {}
    for entry in doc["faults"]:
        token = entry["error"]
        kinds = [entry, *entry.get("variants", ())]
        statuses = sorted({k["status"] for k in kinds if k["status"] is not None})
        (layer,) = {k["layer"] for k in kinds}
        served[token] = (tuple(statuses), layer)
        assert {k["source"] for k in kinds} == {SOURCES.get(token, "proxy")}, token
    assert served == {t: row for t, row in CONTRACT_TABLE.items() if t not in PENDING}


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


def test_the_layers_sources_and_logged_499_are_the_contracts():
    assert {layer.value for layer in Layer} == {
        "client",
        "proxy",
        "transport",
        "upstream",
        "origin",
    }
    assert {source.value for source in Source} == {"origin", "proxy", "client"}
    row = re.search(
        r"^\| `client_closed_request` \| (\d{3}) \(logged only\)", CONTRACT_COPY.read_text(), re.M
    )
    assert row is not None and int(row.group(1)) == CLIENT_CLOSED_STATUS


@pytest.mark.parametrize("problem", list(RequestProblem), ids=lambda p: p.value)
def test_info_finds_each_request_problems_own_row(problem):
    assert info(Fault.HTTP_REQUEST_ERROR, problem) is REQUEST_PROBLEMS[problem]
    assert info(Fault.HTTP_REQUEST_ERROR) is TAXONOMY[Fault.HTTP_REQUEST_ERROR]


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
    (Phase.DNS, name_failure(socket.gaierror(socket.EAI_NONAME, "not known")), {}, Fault.DNS_ERROR),
    (Phase.DNS, name_failure(socket.gaierror(socket.EAI_AGAIN, "again")), {}, Fault.DNS_TIMEOUT),
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
    (
        Phase.TLS,
        handshake_failure(ssl.SSLCertVerificationError(1, "bad cert")),
        {},
        Fault.TLS_CERTIFICATE_ERROR,
    ),
    (Phase.TLS, handshake_failure(ssl.SSLError(1, "wrong version")), {}, Fault.TLS_PROTOCOL_ERROR),
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
    return problem_document(
        row, Exchange(0, "127.0.0.1", "app:3000").request_id, detail, "http://app:3000"
    )


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
    assert classify(Phase.DNS, name_failure(socket.gaierror(socket.EAI_NONAME, "x"))) == (
        Fault.DNS_ERROR,
        "NXDOMAIN",
    )


# -- every detail classify writes, word for word --------------------------------------------------
# The detail is what Proxy-Status `details`, the log line and the problem body say: a
# regression in it misleads whoever reads it. Each row: (id, phase, error, facts) -> (fault,
# the exact detail).

MS700 = 700_000_000


def _cert_error(verify_message: str | None, reason: str | None = None) -> BaseException:
    """What the pool makes of the ssl module's certificate error (`handshake_failure`)."""
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = verify_message  # type: ignore[attr-defined]
    error.reason = reason  # type: ignore[misc]
    return handshake_failure(error)


def _ssl_error(reason: str | None) -> BaseException:
    error = ssl.SSLError(1, "[SSL] record layer failure")
    error.reason = reason  # type: ignore[misc]
    return handshake_failure(error)


def _setting(setting: str) -> DeadlineExpired:
    return DeadlineExpired(MS700, setting)


DETAILS: list[tuple[str, Phase, BaseException | None, dict, Fault, str]] = [
    # the pool
    (
        "pool-wait-setting",
        Phase.POOL_WAIT,
        _setting("timeouts.pool_wait"),
        {},
        Fault.CONNECTION_LIMIT_REACHED,
        "no upstream connection slot became free within 700ms (timeouts.pool_wait)",
    ),
    (
        "pool-wait-unknown-limit",
        Phase.POOL_WAIT,
        DeadlineExpired(),
        {},
        Fault.CONNECTION_LIMIT_REACHED,
        "no upstream connection slot became free in time",
    ),
    (
        "pool-wait-other",
        Phase.POOL_WAIT,
        None,
        {},
        Fault.CONNECTION_LIMIT_REACHED,
        "no upstream connection slot became free in time",
    ),
    # name resolution
    (
        "dns-deadline",
        Phase.DNS,
        _setting("timeouts.connect"),
        {},
        Fault.DNS_TIMEOUT,
        "name resolution did not finish within 700ms (timeouts.connect)",
    ),
    (
        "dns-deadline-unknown-limit",
        Phase.DNS,
        DeadlineExpired(),
        {},
        Fault.DNS_TIMEOUT,
        "name resolution did not finish in time",
    ),
    (
        "dns-os-timeout",
        Phase.DNS,
        TimeoutError(),
        {},
        Fault.DNS_TIMEOUT,
        "name resolution did not finish in time",
    ),
    (
        "dns-eai-again",
        Phase.DNS,
        name_failure(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")),
        {},
        Fault.DNS_TIMEOUT,
        "temporary failure in name resolution (EAI_AGAIN)",
    ),
    ("dns-not-a-gaierror", Phase.DNS, OSError(), {}, Fault.DNS_ERROR, "SERVFAIL"),
    ("dns-nothing-said", Phase.DNS, None, {}, Fault.DNS_ERROR, "SERVFAIL"),
    # TCP connect
    (
        "connect-deadline",
        Phase.CONNECT,
        _setting("timeouts.connect"),
        {},
        Fault.CONNECTION_TIMEOUT,
        "TCP connect did not finish within 700ms (timeouts.connect)",
    ),
    (
        "connect-deadline-unknown-limit",
        Phase.CONNECT,
        DeadlineExpired(),
        {},
        Fault.CONNECTION_TIMEOUT,
        "TCP connect timed out (ETIMEDOUT)",
    ),
    (
        "connect-etimedout",
        Phase.CONNECT,
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        {},
        Fault.CONNECTION_TIMEOUT,
        "TCP connect timed out (ETIMEDOUT)",
    ),
    (
        "connect-refused",
        Phase.CONNECT,
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        {},
        Fault.CONNECTION_REFUSED,
        "connection refused (ECONNREFUSED)",
    ),
    (
        "connect-unreachable",
        Phase.CONNECT,
        OSError(errno.EHOSTUNREACH, "No route to host"),
        {},
        Fault.CONNECTION_REFUSED,
        "connect failed (EHOSTUNREACH)",
    ),
    (
        "connect-unknown-errno",
        Phase.CONNECT,
        OSError(99999, "?"),
        {},
        Fault.CONNECTION_REFUSED,
        "connect failed (OSError)",
    ),
    (
        "connect-nothing-said",
        Phase.CONNECT,
        None,
        {},
        Fault.CONNECTION_REFUSED,
        "connect failed (OSError)",
    ),
    # TLS
    (
        "tls-deadline",
        Phase.TLS,
        _setting("timeouts.connect"),
        {},
        Fault.CONNECTION_TIMEOUT,
        "TLS handshake did not finish within 700ms (timeouts.connect)",
    ),
    (
        "tls-os-timeout",
        Phase.TLS,
        TimeoutError(),
        {},
        Fault.CONNECTION_TIMEOUT,
        "TLS handshake timed out",
    ),
    (
        "tls-cert-verify-message",
        Phase.TLS,
        _cert_error("certificate has expired"),
        {},
        Fault.TLS_CERTIFICATE_ERROR,
        "certificate rejected: certificate has expired",
    ),
    (
        "tls-cert-reason-only",
        Phase.TLS,
        _cert_error(None, "CERTIFICATE_VERIFY_FAILED"),
        {},
        Fault.TLS_CERTIFICATE_ERROR,
        "certificate rejected: CERTIFICATE_VERIFY_FAILED",
    ),
    (
        "tls-cert-no-message",
        Phase.TLS,
        _cert_error(None),
        {},
        Fault.TLS_CERTIFICATE_ERROR,
        "certificate rejected: verification failed",
    ),
    (
        "tls-ssl-reason",
        Phase.TLS,
        _ssl_error("WRONG_VERSION_NUMBER"),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "TLS handshake failed: WRONG_VERSION_NUMBER",
    ),
    (
        "tls-ssl-no-reason",
        Phase.TLS,
        _ssl_error(None),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "TLS handshake failed: [SSL] record layer failure",
    ),
    (
        "tls-closed",
        Phase.TLS,
        None,
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "connection closed during the TLS handshake",
    ),
    (
        "tls-reset",
        Phase.TLS,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "connection closed during the TLS handshake (connection reset)",
    ),
    (
        "tls-os-error",
        Phase.TLS,
        OSError(errno.ECONNABORTED, "aborted"),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "connection closed during the TLS handshake (ECONNABORTED)",
    ),
    (
        "tls-other-error-with-words",
        Phase.TLS,
        EOFError("EOF occurred in violation of protocol"),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "connection closed during the TLS handshake (EOF occurred in violation of protocol)",
    ),
    (
        "tls-other-error-without-words",
        Phase.TLS,
        EOFError(),
        {},
        Fault.TLS_PROTOCOL_ERROR,
        "connection closed during the TLS handshake",
    ),
    # before the response head
    (
        "await-head-deadline",
        Phase.AWAIT_HEAD,
        _setting("timeouts.response_headers"),
        {},
        Fault.HTTP_RESPONSE_TIMEOUT,
        "no response headers within 700ms (timeouts.response_headers)",
    ),
    (
        "await-head-deadline-unknown-limit",
        Phase.AWAIT_HEAD,
        DeadlineExpired(),
        {},
        Fault.HTTP_RESPONSE_TIMEOUT,
        "no response headers in time",
    ),
    (
        "await-head-too-large",
        Phase.AWAIT_HEAD,
        ResponseHeadersTooLarge("response header section over 1024 bytes"),
        {},
        Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE,
        "response header section over 1024 bytes",
    ),
    (
        "await-head-upgrade-broken",
        Phase.AWAIT_HEAD,
        UpgradeBroken("upstream answered 101 without an Upgrade header"),
        {},
        Fault.HTTP_UPGRADE_FAILED,
        "upstream answered 101 without an Upgrade header",
    ),
    (
        "await-head-invalid",
        Phase.AWAIT_HEAD,
        UpstreamProtocolError("invalid status line"),
        {},
        Fault.HTTP_PROTOCOL_ERROR,
        "invalid status line",
    ),
    (
        "await-head-cut",
        Phase.AWAIT_HEAD,
        None,
        {"response_bytes_seen": True},
        Fault.HTTP_PROTOCOL_ERROR,
        "upstream closed inside the response header section",
    ),
    (
        "await-head-cut-by-reset",
        Phase.AWAIT_HEAD,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        {"response_bytes_seen": True},
        Fault.HTTP_PROTOCOL_ERROR,
        "upstream closed inside the response header section (connection reset)",
    ),
    (
        "send-closed",
        Phase.SEND,
        None,
        {},
        Fault.CONNECTION_TERMINATED,
        "upstream closed the connection while the request was sent",
    ),
    (
        "send-broken-pipe",
        Phase.SEND,
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        {},
        Fault.CONNECTION_TERMINATED,
        "upstream closed the connection while the request was sent (EPIPE)",
    ),
    (
        "await-head-closed",
        Phase.AWAIT_HEAD,
        None,
        {},
        Fault.CONNECTION_TERMINATED,
        "upstream closed the connection before responding",
    ),
    (
        "await-head-reset",
        Phase.AWAIT_HEAD,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        {},
        Fault.CONNECTION_TERMINATED,
        "upstream closed the connection before responding (connection reset)",
    ),
    # an Upgrade request: a hang-up or invalid bytes are a broken upgrade; a timeout or an
    # oversized head stay what they are
    (
        "upgrade-closed",
        Phase.AWAIT_HEAD,
        None,
        {"upgrade": True},
        Fault.HTTP_UPGRADE_FAILED,
        "upstream closed the connection before responding",
    ),
    (
        "upgrade-invalid",
        Phase.AWAIT_HEAD,
        UpstreamProtocolError("invalid status line"),
        {"upgrade": True},
        Fault.HTTP_UPGRADE_FAILED,
        "invalid status line",
    ),
    (
        "upgrade-deadline",
        Phase.AWAIT_HEAD,
        _setting("timeouts.response_headers"),
        {"upgrade": True},
        Fault.HTTP_RESPONSE_TIMEOUT,
        "no response headers within 700ms (timeouts.response_headers)",
    ),
    (
        "upgrade-too-large",
        Phase.AWAIT_HEAD,
        ResponseHeadersTooLarge("response header section over 1024 bytes"),
        {"upgrade": True},
        Fault.HTTP_RESPONSE_HEADER_SECTION_SIZE,
        "response header section over 1024 bytes",
    ),
    (
        "tunnel-closed",
        Phase.TUNNEL,
        None,
        {},
        Fault.HTTP_UPGRADE_FAILED,
        "upstream closed the tunnel",
    ),
    (
        "tunnel-reset",
        Phase.TUNNEL,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        {},
        Fault.HTTP_UPGRADE_FAILED,
        "upstream closed the tunnel (connection reset)",
    ),
    # mid-body
    (
        "body-deadline",
        Phase.BODY,
        _setting("timeouts.upstream_read"),
        {},
        Fault.CONNECTION_READ_TIMEOUT,
        "upstream sent nothing for 700ms (timeouts.upstream_read)",
    ),
    (
        "body-deadline-unknown-limit",
        Phase.BODY,
        DeadlineExpired(),
        {},
        Fault.CONNECTION_READ_TIMEOUT,
        "upstream sent nothing for too long",
    ),
    (
        "body-bad-framing",
        Phase.BODY,
        UpstreamProtocolError("invalid chunk size"),
        {},
        Fault.HTTP_PROTOCOL_ERROR,
        "invalid response body framing: invalid chunk size",
    ),
    (
        "body-closed",
        Phase.BODY,
        None,
        {},
        Fault.HTTP_RESPONSE_INCOMPLETE,
        "upstream closed mid-body",
    ),
    (
        "body-reset",
        Phase.BODY,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        {},
        Fault.HTTP_RESPONSE_INCOMPLETE,
        "upstream closed mid-body (connection reset)",
    ),
    (
        "body-os-error",
        Phase.BODY,
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        {},
        Fault.HTTP_RESPONSE_INCOMPLETE,
        "upstream closed mid-body (ETIMEDOUT)",
    ),
]


@pytest.mark.parametrize(
    ("phase", "error", "facts", "fault", "detail"),
    [row[1:] for row in DETAILS],
    ids=[row[0] for row in DETAILS],
)
def test_each_classified_detail_word_for_word(phase, error, facts, fault, detail):
    assert classify(phase, error, **facts) == (fault, detail)


# getaddrinfo's answer -> the rcode Proxy-Status carries (RFC 9209 dns_error), or dns_timeout.
GAI_CASES = [
    ("EAI_NONAME", socket.EAI_NONAME, Fault.DNS_ERROR, "NXDOMAIN"),
    ("EAI_NODATA", getattr(socket, "EAI_NODATA", -5), Fault.DNS_ERROR, "NOERROR"),
    ("EAI_FAIL", socket.EAI_FAIL, Fault.DNS_ERROR, "SERVFAIL"),
    ("EAI_AGAIN", socket.EAI_AGAIN, Fault.DNS_TIMEOUT, None),
    ("EAI_SERVICE-unknown", socket.EAI_SERVICE, Fault.DNS_ERROR, "SERVFAIL"),
    ("EAI_SYSTEM-unknown", socket.EAI_SYSTEM, Fault.DNS_ERROR, "SERVFAIL"),
    ("no-errno", None, Fault.DNS_ERROR, "SERVFAIL"),
]


@pytest.mark.parametrize(
    ("code", "fault", "rcode"), [c[1:] for c in GAI_CASES], ids=[c[0] for c in GAI_CASES]
)
def test_each_getaddrinfo_error_gives_its_rcode(code, fault, rcode):
    error = (
        name_failure(socket.gaierror("lookup failed"))
        if code is None
        else name_failure(socket.gaierror(code, "x"))
    )
    got, detail = classify(Phase.DNS, error)
    assert got is fault
    if rcode is not None:
        assert detail == rcode
    else:
        assert detail == "temporary failure in name resolution (EAI_AGAIN)"


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (999_000_000, "999ms"),
        (999_400_000, "999ms"),
        (1_000_000_000, "1s"),
        (1_000_400_000, "1s"),
        (60 * 10**9, "60s"),  # one minute stays in seconds
        (90 * 10**9, "90s"),
        (119 * 10**9, "119s"),
        (180 * 10**9, "3m"),
        (150 * 10**9, "150s"),
        (0, "0ms"),
    ],
)
def test_durations_at_their_boundaries(ns, text):
    assert duration_text(ns) == text


def test_a_deadline_names_its_limit_only_when_it_knows_its_setting():
    assert DeadlineExpired(MS700, "timeouts.connect").within() == " within 700ms (timeouts.connect)"
    assert DeadlineExpired(MS700).within() == ""


# -- the words a user reads ---------------------------------------------------------------------
# Every row's title, hop, meaning, advice and hint reach the client's problem body or HTML
# page, /faults, the dashboard and the terminal. A refactor must not change them by accident:
# tests/fault_words.json keeps them; after a deliberate change, rewrite it with
# `python3 tests/test_faults.py` and review the diff.

FAULT_WORDS = ROOT / "tests" / "fault_words.json"
WORD_FIELDS = ("title", "hop", "meaning", "advice", "hint")


def current_words() -> dict[str, dict[str, str]]:
    rows = [(row.token, row) for row in TAXONOMY.values()]
    rows += [(f"{row.token}/{problem.value}", row) for problem, row in REQUEST_PROBLEMS.items()]
    return {key: {name: getattr(row, name) for name in WORD_FIELDS} for key, row in rows}


def test_the_words_are_the_reviewed_ones():
    assert current_words() == json.loads(FAULT_WORDS.read_text()), (
        "the taxonomy's words changed: if on purpose, run `python3 tests/test_faults.py`"
    )


@pytest.mark.parametrize(
    "row",
    list({id(r): r for r in [*TAXONOMY.values(), *REQUEST_PROBLEMS.values()]}.values()),
    ids=lambda r: f"{r.token}-{r.status}",
)
def test_a_hint_names_the_upstream_where_it_says_so(row):
    hint = row.hint_for("app.internal:3000")
    assert hint and "{upstream}" not in hint
    assert ("app.internal:3000" in hint) == ("{upstream}" in row.hint)


if __name__ == "__main__":
    FAULT_WORDS.write_text(json.dumps(current_words(), indent=2, ensure_ascii=False) + "\n")
