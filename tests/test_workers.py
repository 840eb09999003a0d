"""`--workers N` (issue 20): N processes serve one listen port; one admin server merges them.

Real processes and sockets: `python -m proxy serve --workers 2` in front of the demo origin
(which fails on request), an aiohttp client on 127.0.0.1.
- After a mixed-fault load over 50 connections, `/stats` and `/metrics` equal the client's
  own tally exactly, and both workers served some of it.
- SIGTERM with slow requests in flight on both workers: every one finishes (0 failed), the
  supervisor and both workers exit 0.
- A worker killed with SIGKILL is replaced (a new pid in its slot), logged and counted; what
  it had counted before it died stays in the totals.
- `workers` has its environment twin, and a bad value is one line and exit 2.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from proxy.demo import start_demo_origin

from support import ROOT, ProxyProcess, free_port, spawn_proxy

# path -> (status the client sees, source /stats charges it to)
MIX = {
    "/hello": (200, "origin"),
    "/status/404": (404, "origin"),
    "/status/500": (500, "origin"),
    "/hangup": (502, "proxy"),
    "/garbage": (502, "proxy"),
}


async def _json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _load(url: str, paths: list[str], connections: int = 50) -> collections.Counter[int]:
    """Every path once, `connections` at a time; the statuses the client got."""
    tally: collections.Counter[int] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(reversed(paths))

        async def client() -> None:
            while queue:
                path = queue.pop()
                async with session.get(url + path) as response:
                    await response.read()
                    tally[response.status] += 1

        await asyncio.gather(*(client() for _ in range(connections)))
    return tally


def _workers(stats: dict[str, Any]) -> list[dict[str, Any]]:
    workers = stats["proxy"]["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    return workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids if os.path.exists(f"/proc/{pid}")):
            return True
        time.sleep(0.05)
    return False


def _metric(text: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def demo_url():
    origin = await start_demo_origin()
    yield origin.url
    await origin.close()


def _spawn(upstream: str, *args: str) -> ProxyProcess:
    return spawn_proxy(upstream, "--workers", "2", "--log-format", "json", *args)


async def test_stats_and_metrics_are_the_exact_merge_of_both_workers(demo_url: str) -> None:
    proxy = await asyncio.to_thread(_spawn, demo_url)
    try:
        paths = [path for path in MIX for _ in range(120)]
        tally = await _load(proxy.url, paths)
        expected = collections.Counter(MIX[p][0] for p in paths)
        assert tally == expected
        async with aiohttp.ClientSession() as session:
            stats = await _json(session, proxy.admin_url + "/stats")
            async with session.get(proxy.admin_url + "/metrics") as response:
                metrics = await response.text()
        assert stats["requests"]["total"] == len(paths)
        assert stats["responses"]["by_status"] == {str(s): n for s, n in sorted(tally.items())}
        by_source = collections.Counter()
        for path in paths:
            by_source[MIX[path][1]] += 1
        assert stats["responses"]["by_source"] == dict(by_source)
        assert stats["latency_ms"]["total"]["count"] == len(paths)
        assert stats["windows"]["60s"]["responses"]["total"] == len(paths)
        assert stats["loop_lag_ms"]["total"]["samples"] > 0  # the workers' loops, merged
        assert set(stats["gc_ms"]) == {"0", "1", "2"}
        workers = _workers(stats)
        assert sum(w["requests"] for w in workers) == len(paths)
        assert all(w["requests"] > 0 for w in workers), workers  # both served
        assert len({w["pid"] for w in workers}) == 2
        assert _metric(metrics, "faultline_responses_total") == len(paths)
        assert _metric(metrics, "faultline_request_duration_seconds_count") == len(paths)
        assert _metric(metrics, "faultline_workers") == 2
        assert _metric(metrics, "faultline_worker_restarts_total") == 0
        assert 'faultline_responses_total{code="502"' in metrics
        assert len(stats["recent_errors"]) == 100  # the newest of both workers' errors
        times = [e["time"] for e in stats["recent_errors"]]
        assert times == sorted(times, reverse=True)
    finally:
        assert proxy.stop() == 0


async def test_sigterm_drains_both_workers_with_no_failed_request(demo_url: str) -> None:
    proxy = await asyncio.to_thread(_spawn, demo_url)
    async with aiohttp.ClientSession() as session:
        pids = [w["pid"] for w in _workers(await _json(session, proxy.admin_url + "/stats"))]

    async def slow() -> int:
        # One connection each: they are spread over both workers by the kernel.
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(proxy.url + "/slow?ms=1500") as response,
        ):
            await response.read()
            return response.status

    requests = [asyncio.ensure_future(slow()) for _ in range(20)]
    await asyncio.sleep(0.6)
    async with aiohttp.ClientSession() as session:
        stats = await _json(session, proxy.admin_url + "/stats")
    assert stats["requests"]["in_flight"] == 20
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*requests) == [200] * 20
    assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
    assert _gone(pids)
    stderr = proxy.proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "draining 2 workers" in stderr, stderr


async def test_a_killed_worker_is_replaced_logged_and_counted(demo_url: str) -> None:
    proxy = await asyncio.to_thread(_spawn, demo_url)
    try:
        await _load(proxy.url, ["/hello"] * 30, connections=10)
        async with aiohttp.ClientSession() as session:
            before = _workers(await _json(session, proxy.admin_url + "/stats"))
            victim = before[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                workers = _workers(await _json(session, proxy.admin_url + "/stats"))
                if workers[0]["pid"] not in (victim, 0) and workers[0]["restarts"] == 1:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"worker 0 was not replaced: {workers}")
            assert workers[1]["pid"] == before[1]["pid"]
            assert workers[1]["restarts"] == 0
            tally = await _load(proxy.url, ["/hello"] * 30, connections=10)
            assert tally == {200: 30}
            stats = await _json(session, proxy.admin_url + "/stats")
            async with session.get(proxy.admin_url + "/metrics") as response:
                metrics = await response.text()
        assert stats["requests"]["total"] == 60  # the dead worker's 30-odd are kept
        assert _metric(metrics, "faultline_worker_restarts_total") == 1
        assert _metric(metrics, "faultline_workers") == 2
    finally:
        assert proxy.stop() == 0
    stderr = proxy.proc.stderr.read().decode()  # type: ignore[union-attr]
    assert f"worker 0 (pid {victim}) killed by SIGKILL" in stderr, stderr


async def test_both_workers_log_every_exchange_as_whole_lines(demo_url: str) -> None:
    """Both workers write JSON lines to one pipe (a container's stdout): each line whole,
    one per exchange."""
    proxy = await asyncio.to_thread(
        spawn_proxy, demo_url, "--workers", "2", "--log-format", "json", stdout=subprocess.PIPE
    )
    assert proxy.proc.stdout is not None
    reading = asyncio.ensure_future(asyncio.to_thread(proxy.proc.stdout.read))
    try:
        paths = [f"/hello?{'q' * (1 + i % 700)}" for i in range(1500)]
        tally = await _load(proxy.url, paths)
        assert tally == {200: len(paths)}
    finally:
        assert proxy.stop() == 0
    lines = (await reading).decode().splitlines()
    assert len(lines) == len(paths)
    records = [json.loads(line) for line in lines]
    assert sorted(r["path"] for r in records) == sorted(paths)


async def test_a_stalled_worker_shows_in_the_merged_loop_lag(demo_url: str) -> None:
    """A worker stopped for 0.4 s (SIGSTOP, then SIGCONT) stalls its loop: the supervisor's
    /stats shows that stall among the workers' (loop_lag_ms.stalls, merged)."""
    proxy = await asyncio.to_thread(_spawn, demo_url)
    try:
        async with aiohttp.ClientSession() as session:
            before = await _json(session, proxy.admin_url + "/stats")
            assert before["loop_lag_ms"]["stalls"]["count"] == 0
            victim = _workers(before)[1]["pid"]
            os.kill(victim, signal.SIGSTOP)
            await asyncio.sleep(0.4)
            os.kill(victim, signal.SIGCONT)
            await asyncio.sleep(0.3)  # its watch runs again and notes the stall
            after = await _json(session, proxy.admin_url + "/stats")
        stalls = after["loop_lag_ms"]["stalls"]
        assert stalls["count"] >= 1, stalls
        assert stalls["longest"] >= 300, stalls
    finally:
        assert proxy.stop() == 0


async def test_workers_run_their_supervisors_code_wherever_it_starts(
    demo_url: str, tmp_path
) -> None:
    """Started from a directory that holds another `proxy` package (a checkout), the
    workers still import the supervisor's own code, not that one."""
    fake = tmp_path / "proxy"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong proxy package')\n")
    port, admin = free_port(), free_port()
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from proxy.cli import main; main()"
    argv = ["--upstream", demo_url, "--listen", f"127.0.0.1:{port}"]
    argv += ["--admin", f"127.0.0.1:{admin}", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", *argv],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    proxy = ProxyProcess(proc, port, admin)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                if proc.poll() is not None:
                    break
                try:
                    stats = await _json(session, proxy.admin_url + "/stats")
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            assert len(_workers(stats)) == 2
            async with session.get(proxy.url + "/hello") as response:
                assert response.status == 200
    finally:
        assert proxy.stop() == 0


async def test_a_worker_that_answered_late_is_still_heard(demo_url: str) -> None:
    """A worker stopped past the supervisor's patience (its /stats answer comes after the
    asker gave up) keeps being counted afterwards: the late answer is dropped, the next
    ones are read."""
    proxy = await asyncio.to_thread(_spawn, demo_url)
    try:
        async with aiohttp.ClientSession() as session:
            late = _workers(await _json(session, proxy.admin_url + "/stats"))[1]["pid"]
            os.kill(late, signal.SIGSTOP)
            try:
                await _json(session, proxy.admin_url + "/stats")  # waits ~2 s, then answers
            finally:
                os.kill(late, signal.SIGCONT)
            await asyncio.sleep(0.3)
            await _load(proxy.url, ["/hello"] * 200, connections=20)
            stats = await _json(session, proxy.admin_url + "/stats")
        assert stats["requests"]["total"] == 200
        assert all(w["requests"] > 0 for w in _workers(stats)), _workers(stats)
    finally:
        assert proxy.stop() == 0


async def test_workers_from_the_environment(demo_url: str) -> None:
    proxy = await asyncio.to_thread(
        spawn_proxy, demo_url, "--log-format", "json", env={"FAULTLINE_WORKERS": "2"}
    )
    try:
        async with aiohttp.ClientSession() as session:
            stats = await _json(session, proxy.admin_url + "/stats")
        assert len(_workers(stats)) == 2
    finally:
        assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("value", "words"),
    [("0", "workers: expected an integer >= 1, got 0"), ("two", "workers: expected an integer")],
)
async def test_a_bad_worker_count_is_one_line_and_exit_2(value: str, words: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            "--workers",
            value,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    assert words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
