"""bench/hotpath.py keeps measuring the real hot path (it must not rot into a no-op)."""

from __future__ import annotations

import orjson
import pytest

from proxy.telemetry.logoutput import LineOutput

from support import load_bench_module


def load_hotpath():
    return load_bench_module("hotpath")


@pytest.mark.parametrize("name", ["full", "pst", "nodiag"])
def test_every_exchange_is_forwarded_answered_and_counted(name, tmp_path):
    hotpath = load_hotpath()
    rig = hotpath.Rig(hotpath.CONFIGURATIONS[name])
    try:
        rig.run(300)
        stats = rig.telemetry.stats
        assert stats.total == 300 and stats.in_flight == 0
        assert stats.counts == {(200, "origin", None): 300}
        # Each request went upstream once and each response came back with our headers.
        assert rig.origin.written > 300 * len(hotpath.REQUEST)
        per_response = rig.client.written / 300
        assert per_response > len(hotpath.RESPONSE)
    finally:
        rig.close()


def test_the_logged_line_is_the_contract_object(tmp_path):
    hotpath = load_hotpath()
    rig = hotpath.Rig(hotpath.CONFIGURATIONS["full"])
    log = tmp_path / "access.log"
    try:
        with log.open("wb") as sink:
            assert rig.telemetry.access_log is not None
            rig.telemetry.access_log.output = LineOutput(sink)
            rig.run(3)
        lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    finally:
        rig.close()
    assert len(lines) == 3
    assert [(r["status"], r["source"], r["reused"]) for r in lines] == [(200, "origin", True)] * 3
