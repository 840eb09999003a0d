"""The proxy's own request ids: `<instance>-<counter in at least 8 hex digits>`, made
without a bytes format per request (ForwardContext.new_request_id, issue 20)."""

from __future__ import annotations

import asyncio

from proxy.config import load_config
from proxy.forward.context import ForwardContext
from proxy.server import build_context
from proxy.telemetry.sink import Telemetry
from proxy.telemetry.stats import Stats


def make_context() -> tuple[ForwardContext, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    config = load_config(env={}, flags={("upstream",): "http://127.0.0.1:9"})
    ctx, _, _ = build_context(config, loop, Telemetry(Stats(), None), "0123456789abcdef")
    return ctx, loop


def test_ids_count_up_in_hex_across_every_carry():
    ctx, loop = make_context()
    try:
        for n in range(1, 70_000):  # past the carries at 0x100 and 0x10000
            assert ctx.new_request_id() == b"01234567-%08x" % n
        ctx._id_counter = 0xFFFF_FF00  # the counter outgrows 8 digits, as %08x would
        ctx._id_high = b"01234567-%06x" % (ctx._id_counter >> 8)
        for n in range(0xFFFF_FF01, 0x1_0000_0200):
            assert ctx.new_request_id() == b"01234567-%08x" % n
    finally:
        loop.close()
