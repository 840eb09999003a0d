"""`workers: N` (N > 1): N worker processes serve one listen socket; this process supervises.

Why processes: one Python process runs Python on one core at a time (the GIL), so threads
would share one core; nginx's `worker_processes` and HAProxy's `nbproc` made the same
choice for the same kind of reason. The listen port is N sockets with SO_REUSEPORT, one
per worker, all bound here: the kernel spreads new connections over them by their
addresses (one socket shared by every worker was tried first: whichever worker woke first
accepted a whole burst, 600 of 600 exchanges on one worker of two). This process keeps
every socket open, so connections waiting in a dead worker's accept queue are not lost:
its replacement inherits the same socket and serves them.

The supervisor:
1. binds the listen sockets, starts the workers (`worker.py`) and waits for each to serve;
2. serves the admin port. A reading endpoint (`/stats`, `/metrics`, `/series`, `/latency`)
   first asks every worker for its counts and adds them up (`telemetry.merge`): exact
   totals, percentiles from merged histograms. It also polls every `POLL_S`, so a worker
   that dies keeps counting with what it had reported (at most `POLL_S` of it is lost);
3. restarts a worker that dies, logs it and counts it (`/stats` `proxy.workers`,
   `faultline_worker_restarts_total`), backing off when one dies soon after starting;
4. on SIGTERM or SIGINT turns `/readyz` 503 and forwards SIGTERM to every worker, each
   draining as CONTRACT.md's lifecycle says, and exits 0 when they all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..admin import Workers, start_admin
from ..config import Config
from ..server import StartupError, bind_error, listen_tls
from ..telemetry.logoutput import restore_blocking
from ..telemetry.merge import State, absorb, reset
from ..telemetry.sink import Telemetry
from ..telemetry.stats import Stats
from . import channel

log = logging.getLogger("faultline")

# A worker runs this supervisor's own code: the directory holding its `proxy` package goes
# first on the worker's path (`python -m` would put the working directory first, and a
# checkout there would run other code).
PACKAGE_ROOT: Final = Path(__file__).resolve().parent.parent.parent
WORKER_MAIN: Final = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from proxy.supervisor.worker import main; sys.exit(main())"
)

POLL_S: Final = 1.0  # how often every worker's counts are fetched, besides reads
ASK_TIMEOUT_S: Final = 2.0  # a worker that does not answer in time: its last counts are used
START_TIMEOUT_S: Final = 30.0
QUICK_DEATH_S: Final = 10.0  # a worker that dies sooner after starting is restarted later
BACKOFF_MAX_S: Final = 30.0
STOP_MARGIN_S: Final = 5.0  # beyond shutdown_delay + drain, before a worker is killed


class Slot:
    """One worker's place: the process in it now, and what the ones before it counted."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pid = 0
        self.started_at = 0.0
        self.restarts = 0
        self.quick_deaths = 0
        self.state: State | None = None  # the current worker's last counts
        self.asked: list[asyncio.Future[State]] = []  # state requests, answered in order
        self.ready: asyncio.Future[str | None] | None = None
        self.reading: asyncio.Task[None] | None = None  # the channel's reader

    def listing(self) -> dict[str, Any]:
        requests = self.state["total"] if self.state else 0
        return {
            "index": self.index,
            "pid": self.pid,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "requests": requests,
        }


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots = [Slot(i) for i in range(config.workers)]
        self.telemetry = Telemetry(Stats(config.stats.recent_errors), None)
        self.retired: list[State] = []  # the last counts of workers that exited
        self.socks: list[socket.socket] = []  # one per slot: the listen port
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._admin: Any = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.ready = False

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        listen_tls(config)  # a bad certificate is one line now, not N workers failing
        self.socks = _bind(config, len(self.slots))
        self.listen_address = self.socks[0].getsockname()[:2]
        try:
            failures = await asyncio.gather(*(self._spawn(slot) for slot in self.slots))
            failed = next((f for f in failures if f), None)
            if failed:
                raise StartupError(failed)
            workers = Workers(self._refresh, self._listing, WorkersCollector(self))
            try:
                self._admin, self.admin_address = await start_admin(
                    config, self.telemetry, lambda: self.ready, self._pool_counts, workers
                )
            except OSError as exc:
                raise StartupError(bind_error("admin.listen", config.admin.listen, exc)) from None
        except BaseException:
            await self._kill_all()
            raise
        self._spawn_task(self._poll())
        self.ready = True

    async def _spawn(self, slot: Slot) -> str | None:
        """Start a worker in `slot`; None once it serves, else why it could not start."""
        ours, theirs = socket.socketpair()
        listen_fd = self.socks[slot.index].fileno()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER_MAIN,
            str(PACKAGE_ROOT),
            str(theirs.fileno()),
            str(listen_fd),
            str(slot.index),
            pass_fds=(theirs.fileno(), listen_fd),
            start_new_session=True,
        )
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        slot.process, slot.writer, slot.pid = process, writer, process.pid
        slot.started_at, slot.state, slot.asked = time.time(), None, []
        slot.ready = asyncio.get_running_loop().create_future()
        channel.send(writer, channel.CONFIG, self.config)
        slot.reading = self._spawn_task(self._read(slot, reader))
        try:
            failure = await asyncio.wait_for(asyncio.shield(slot.ready), START_TIMEOUT_S)
        except TimeoutError:
            failure = f"worker {slot.index} did not start in {START_TIMEOUT_S:.0f} s"
        if failure is None:
            self._spawn_task(self._watch(slot, process))
        return failure

    async def _read(self, slot: Slot, reader: asyncio.StreamReader) -> None:
        """A worker's messages, until its channel ends."""
        ready = slot.ready
        try:
            while True:
                kind, payload = await channel.receive(reader)
                if kind == channel.READY and ready is not None and not ready.done():
                    slot.pid, slot.started_at = payload["pid"], payload["started_at"]
                    ready.set_result(None)
                elif kind == channel.FAILED and ready is not None and not ready.done():
                    ready.set_result(payload)
                elif kind == channel.STATE and slot.asked:
                    asked = slot.asked.pop(0)
                    if not asked.done():  # its asker may have given up waiting (ASK_TIMEOUT_S)
                        asked.set_result(payload)
                elif kind == channel.FINAL:
                    slot.state = payload
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if ready is not None and not ready.done():
            ready.set_result(f"worker {slot.index} exited before serving")
        for asked in slot.asked:
            if not asked.done():
                asked.cancel()

    # -- a worker's death ----------------------------------------------------------------------

    async def _watch(self, slot: Slot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if slot.process is not process:
            return
        if slot.reading is not None:  # its last words (the final counts) are read first
            await asyncio.wait([slot.reading], timeout=1.0)
        slot.process = slot.writer = None
        if slot.state is not None:
            self.retired.append(_settled(slot.state))
            slot.state = None
        if self._stopping.is_set():
            return
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        lived = time.time() - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
        delay = min(0.5 * 2 ** (slot.quick_deaths - 1), BACKOFF_MAX_S) if slot.quick_deaths else 0
        slot.restarts += 1
        log.error(
            "worker %d (pid %d) %s after %.1f s; starting another%s (restart %d)",
            slot.index,
            slot.pid,
            how,
            lived,
            f" in {delay:.1f} s" if delay else "",
            slot.restarts,
        )
        await asyncio.sleep(delay)
        if self._stopping.is_set():
            return
        failure = await self._spawn(slot)
        if failure is not None:
            log.error("worker %d could not start again: %s", slot.index, failure)

    # -- counts --------------------------------------------------------------------------------

    async def _ask(self, slot: Slot) -> None:
        """The worker's counts now, into `slot.state` (kept as they were if it does not
        answer in time: it is busy, stalled or exiting)."""
        writer = slot.writer
        if writer is None or writer.is_closing():
            return
        asked: asyncio.Future[State] = asyncio.get_running_loop().create_future()
        slot.asked.append(asked)
        channel.send(writer, channel.STATE, None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            slot.state = await asyncio.wait_for(asked, ASK_TIMEOUT_S)

    async def _refresh(self, request: Any = None) -> None:
        """Every worker's counts now, added up into the telemetry the admin app reads."""
        await asyncio.gather(*(self._ask(slot) for slot in self.slots))
        reset(self.telemetry)
        for state in self.retired:
            absorb(self.telemetry, state)
        for slot in self.slots:
            if slot.state is not None:
                absorb(self.telemetry, slot.state)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await asyncio.gather(*(self._ask(slot) for slot in self.slots))

    def _pool_counts(self) -> tuple[int, int]:
        idle = busy = 0
        for slot in self.slots:
            if slot.state is not None:
                idle += slot.state["pool"][0]
                busy += slot.state["pool"][1]
        return idle, busy

    def _listing(self) -> list[dict[str, Any]]:
        return [slot.listing() for slot in self.slots]

    # -- stop ----------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stopping.is_set():
            log.warning("second %s: the workers exit without waiting for the drain", name)
            self._signal_all(signal.SIGTERM)  # a worker's second signal: it exits at once
            return
        log.info("%s: draining %d workers (readyz now 503)", name, len(self.slots))
        self.request_stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Drain every worker (each runs the contract's sequence); return when all exited."""
        self.ready = False
        self._close_socks()  # the workers' copies stay open until each stops accepting
        self._signal_all(signal.SIGTERM)
        timeouts = self.config.timeouts
        limit = timeouts.shutdown_delay + timeouts.drain + STOP_MARGIN_S
        waits = [slot.process.wait() for slot in self.slots if slot.process is not None]
        if waits:
            _, late = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=limit)
            if late:
                log.error("%d workers did not drain in %.1f s: killed", len(late), limit)
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(late, timeout=STOP_MARGIN_S)
        await asyncio.sleep(0)  # the final counts they sent are read
        await self.close()

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    async def _kill_all(self) -> None:
        self._stopping.set()
        self._signal_all(signal.SIGKILL)
        for slot in self.slots:
            if slot.process is not None:
                await slot.process.wait()
        await self.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        self._close_socks()

    def _close_socks(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class WorkersCollector:
    """The supervisor's own metric families: workers running, and restarts."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        slots = self.supervisor.slots
        yield GaugeMetricFamily(
            "faultline_workers",
            "Worker processes serving the listen port now (the configured number while "
            "none has died).",
            value=sum(1 for s in slots if s.process is not None),
        )
        yield CounterMetricFamily(
            "faultline_worker_restarts_total",
            "Worker processes that died and were started again.",
            value=sum(s.restarts for s in slots),
        )


def _settled(state: State) -> State:
    """A dead worker's last counts, kept: nothing of it is in flight or pooled any more."""
    return {**state, "in_flight": 0, "pool": (0, 0)}


def _signal_name(number: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(number).name
    return f"signal {number}"


def _bind(config: Config, count: int) -> list[socket.socket]:
    """The listen port as `count` sockets with SO_REUSEPORT, one per worker (StartupError
    when it cannot be bound). With port 0, the port the first one got."""
    host, port = config.listen
    socks: list[socket.socket] = []
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(4096)
            address = sock.getsockname()  # port 0: the others join the port it got
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise StartupError(bind_error("listen", config.listen, exc)) from None
    return socks


async def run(config: Config, on_started: Callable[[Supervisor], None] | None = None) -> None:
    supervisor = Supervisor(config)
    await supervisor.start()
    supervisor.install_signal_handlers()
    if on_started is not None:
        on_started(supervisor)
    with contextlib.suppress(asyncio.CancelledError):
        await supervisor.serve_until_stopped()
    restore_blocking((1, 2))  # the workers made stdout and stderr non-blocking; all are gone
