#!/usr/bin/env python3
"""What the `h2` library alone costs per HTTP/2 exchange, as Faultline's client side uses it.

bench.py's h2c scenarios put Faultline at a tenth of nginx's req/s, and a profile under
h2load gives h2, hpack and hyperframe (pure Python) 60-80 % of the proxy's CPU. This measures
that part without sockets or Faultline: a server-side `H2Connection` (as proxy/http2/client.py
configures it) receives one request HEADERS (what h2load sends) and answers with HEADERS
(the 9 fields Faultline sends for bench.py's origin, two of them unique per response) and
one 12-byte DATA frame. Then the same with settings that h2 offers, one at a time and all
together, to show what they would save. Best of 5 runs, µs per exchange.

    python3 bench/h2cost.py            # 3000 exchanges a run
    taskset -c 1 python3 bench/h2cost.py -n 1000
"""

from __future__ import annotations

import argparse
import functools
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import NeverIndexedHeaderTuple

REQUEST = [
    (":method", "GET"),
    (":path", "/"),
    (":scheme", "http"),
    (":authority", "127.0.0.1:17650"),
    ("user-agent", "h2load nghttp2/1.52.0"),
]
RESPONSE = [  # what Faultline answered over h2c for bench.py's origin (nghttp -v)
    (b":status", b"200"),
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Mon, 07 Dec 2026 01:03:53 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"12"),
    (b"proxy-status", b'faultline; received-status=200; next-hop="127.0.0.1:17600"'),
    (b"via", b"1.1 faultline"),
]
BODY = b"hello world\n"


def unique_fields(i: int) -> list[tuple[bytes, bytes]]:
    """The two fields whose value differs on every response."""
    timing = b'ttfb;dur=0.%03d;desc="upstream first byte", proxy;dur=0.0%02d;desc="in proxy"'
    return [
        (b"server-timing", timing % (i % 1000, i % 100)),
        (b"x-request-id", b"fe25bd38-%08x" % i),
    ]


def connections(validate: bool) -> tuple[H2Connection, H2Connection]:
    config = H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,  # as proxy/http2/client.py: the codec checks them
        validate_outbound_headers=validate,
        normalize_outbound_headers=validate,
    )
    server = H2Connection(config)
    server.initiate_connection()
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server, client


def run(
    n: int,
    *,
    validate: bool = True,
    huffman: bool = True,
    never_index: bool = False,
    one_data: bool = False,
) -> float:
    """Best of 5: seconds per exchange (request HEADERS in, HEADERS + DATA out)."""
    best = float("inf")
    for _ in range(5):
        server, client = connections(validate)
        if not huffman:
            server.encoder.encode = functools.partial(server.encoder.encode, huffman=False)  # type: ignore[method-assign]
        frames = []
        for i in range(n):  # the client's side is built before the clock starts
            client.send_headers(1 + 2 * i, REQUEST, end_stream=True)
            frames.append(client.data_to_send())
        start = time.perf_counter()
        for i in range(n):
            stream_id = 1 + 2 * i
            server.receive_data(frames[i])
            fields: list = unique_fields(i)
            if never_index:
                fields = [NeverIndexedHeaderTuple(k, v) for k, v in fields]
            server.send_headers(stream_id, RESPONSE + fields)
            if one_data:
                server.send_data(stream_id, BODY, end_stream=True)
            else:  # what Faultline sends today: DATA, then an empty DATA with END_STREAM
                server.send_data(stream_id, BODY)
                server.end_stream(stream_id)
            server.data_to_send()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="exchanges per run")
    n = ap.parse_args(argv).n
    cases = [
        ("as Faultline: DATA + empty DATA(END_STREAM)", {}),
        ("  the last DATA carries END_STREAM", {"one_data": True}),
        ("  validate/normalize_outbound_headers=False", {"validate": False}),
        ("  no Huffman coding", {"huffman": False}),
        ("  unique fields never indexed", {"never_index": True}),
        (
            "  all four",
            {"one_data": True, "validate": False, "huffman": False, "never_index": True},
        ),
    ]
    base = None
    for label, kwargs in cases:
        t = run(n, **kwargs)
        base = base or t
        print(f"{label:48s} {t * 1e6:7.1f} us/exchange  {t / base - 1:+6.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
