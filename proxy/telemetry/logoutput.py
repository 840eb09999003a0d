"""Where the access log's lines go (stdout), without the proxy ever waiting for a reader.

A container's stdout is a pipe that the runtime reads (conmon, containerd-shim), and so is
`faultline serve | jq`. When the reader stalls, the pipe's 64 KiB fill up and a blocking
write holds the event loop until the reader comes back: measured before this module, a
proxy whose stdout reader had stopped served about 145 exchanges and then nothing, not
even `/healthz` on its admin port. Bookkeeping must never stand in front of a request
(issue 20), so:

Rules:
1. A pipe or a socket is written non-blocking. What it does not take waits in memory, in
   order, and goes out when it is writable again (`add_writer`).
2. At most `WAITING_MAX` bytes wait. Past that, new lines are dropped whole and counted
   (`dropped_lines`: `/stats` `access_log`, `faultline_access_log_dropped_lines_total`).
   A warning names the count once the reader has caught up, not before: stderr is often
   the same stalled pipe, and a blocking write there would hold the loop all the same.
3. Anything else is written as before, blocking: a regular file does not fill up, /dev/null
   never blocks, a terminal's descriptor is shared with the shell (whose flags must not
   change), and a stream without a descriptor (a test's capture) has no flags to change.
4. With several workers on one stdout (`whole_lines`), every write(2) carries whole lines
   and at most PIPE_BUF bytes where the lines allow: a pipe takes that much all at once or
   not at all, so two workers' lines never interleave mid-line.
5. At exit, what still waits gets up to `EXIT_WAIT_S` to go out.
6. The process's own log (stderr: warnings, errors, a flood's GOAWAY per connection) goes
   the same way (`stderr_stream`), non-blocking from the first record written while an
   event loop runs: a stalled stderr reader would hold the loop just the same.
7. The descriptor's flag belongs to everyone who shares it (`(faultline serve; echo done) |
   less`: the shell's next command): what this process made non-blocking is blocking again
   when it exits. A worker leaves that to its supervisor, which exits after its workers
   (`restore_blocking`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import select
import stat
import sys
import time
from collections import deque
from typing import Any, Final

log: Final = logging.getLogger("faultline")

WAITING_MAX: Final = 4 << 20  # bytes of lines that may wait for a slow reader (~9,000 lines)
EXIT_WAIT_S: Final = 1.0

_made_nonblocking: set[int] = set()  # rule 7


def restore_blocking(fds: tuple[int, ...] = ()) -> None:
    """Blocking again: the descriptors this process made non-blocking, and `fds` (a
    supervisor's stdout and stderr, which its workers made non-blocking), if a pipe or a
    socket (rule 7)."""
    for fd in {*_made_nonblocking, *fds}:
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.set_blocking(fd, True)
    _made_nonblocking.clear()


atexit.register(restore_blocking)  # registered first, so it runs after every output's close


class LineOutput:
    """Writes whole access-log lines to a stream; see the module's rules."""

    def __init__(self, stream: Any, whole_lines: bool = False, name: str = "access log") -> None:
        self.stream = stream
        self.whole_lines = whole_lines
        self.name = name  # for the warning of rule 2
        self.fd = -1  # >= 0: a pipe or socket, written non-blocking (rule 1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: deque[bytes] = deque()
        self.waiting_bytes = 0
        self.dropped_lines = 0
        self.reported_dropped = 0  # dropped lines a warning has already named
        self.broken = False  # the reader has gone for good (EPIPE): nothing more is written

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Go non-blocking when the stream is a pipe or a socket (rules 1 and 3)."""
        try:
            fd = self.stream.fileno()
            mode = os.fstat(fd).st_mode
        except (AttributeError, OSError, ValueError):
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return
        with contextlib.suppress(Exception):
            self.stream.flush()  # what was printed before goes first
        if os.get_blocking(fd) and not self.whole_lines:
            _made_nonblocking.add(fd)  # rule 7 (shared with sibling workers: theirs to keep)
        os.set_blocking(fd, False)
        self.fd, self.loop = fd, loop

    def write(self, data: bytes) -> None:
        if self.broken or not data:
            return
        if self.fd < 0:
            self._write_blocking(data)
        elif self.waiting:
            self._wait(data)
        else:
            rest = self._send(data)
            if rest:
                self._queue(rest)
                assert self.loop is not None
                with contextlib.suppress(RuntimeError):  # a closed loop: close() writes it
                    self.loop.add_writer(self.fd, self._drain)

    def close(self) -> None:
        """Stop watching the descriptor; what waits gets `EXIT_WAIT_S` to go out (rule 5)."""
        if self.fd < 0:
            return
        if self.waiting and self.loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closing
                self.loop.remove_writer(self.fd)
        deadline = time.monotonic() + EXIT_WAIT_S
        while self.waiting and not self.broken:
            self._drain_some()
            if self.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(OSError, ValueError):
                    select.select([], [self.fd], [], left)
        if self.waiting:
            self.dropped_lines += sum(chunk.count(b"\n") for chunk in self.waiting)
            self.waiting.clear()
            self.waiting_bytes = 0
        self._report()

    # -- internals -------------------------------------------------------------------------

    def _chunks(self, data: bytes) -> list[bytes] | tuple[bytes]:
        """`data` in writes of whole lines, at most PIPE_BUF bytes each where the lines
        allow (rule 4); in one piece without `whole_lines`."""
        size = len(data)
        if not self.whole_lines or size <= select.PIPE_BUF:
            return (data,)
        chunks = []
        start = 0
        while start < size:
            end = size
            if size - start > select.PIPE_BUF:
                end = data.rfind(b"\n", start, start + select.PIPE_BUF) + 1
                if end <= start:  # one line longer than PIPE_BUF: whole, if not atomic
                    end = data.find(b"\n", start + select.PIPE_BUF) + 1 or size
            chunks.append(data[start:end])
            start = end
        return chunks

    def _write_blocking(self, data: bytes) -> None:
        try:
            if self.whole_lines:
                fd = self.stream.fileno()
                for chunk in self._chunks(data):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            else:
                self.stream.write(data)
                self.stream.flush()
        except (BrokenPipeError, ValueError):
            self.broken = True  # stdout went away (piped to a process that exited)

    def _send(self, data: bytes) -> bytes:
        """Write what the descriptor takes now; return the rest (b"" when all went)."""
        chunks = self._chunks(data)
        for i, chunk in enumerate(chunks):
            try:
                written = os.write(self.fd, chunk)
            except (BlockingIOError, InterruptedError):
                return b"".join(chunks[i:])
            except OSError:  # EPIPE and the like: the reader is gone
                self.broken = True
                return b""
            if written < len(chunk):
                return chunk[written:] + b"".join(chunks[i + 1 :])
        return b""

    def _queue(self, data: bytes) -> None:
        self.waiting.append(data)
        self.waiting_bytes += len(data)

    def _wait(self, data: bytes) -> None:
        if self.waiting_bytes + len(data) > WAITING_MAX:
            self.dropped_lines += data.count(b"\n")  # whole lines: a batch ends in one
            return
        self._queue(data)

    def _drain_some(self) -> None:
        waiting = self.waiting
        while waiting and not self.broken:
            chunk = waiting[0]
            rest = self._send(chunk)
            self.waiting_bytes -= len(chunk) - len(rest)
            if rest:
                waiting[0] = rest
                return
            waiting.popleft()
        if self.broken:
            waiting.clear()
            self.waiting_bytes = 0

    def _drain(self) -> None:
        self._drain_some()
        if not self.waiting:
            assert self.loop is not None
            self.loop.remove_writer(self.fd)
            self._report()

    def _report(self) -> None:
        dropped = self.dropped_lines - self.reported_dropped
        if dropped > 0:
            self.reported_dropped = self.dropped_lines
            log.warning(
                "%s: the reader fell behind and %d line(s) were dropped (more than %d KiB "
                "waited)%s",
                self.name,
                dropped,
                WAITING_MAX >> 10,
                "; counted in /stats access_log.dropped_lines" if self.name == "access log" else "",
            )


class LineStream:
    """A text stream for `logging` over a `LineOutput` (rule 6): it goes non-blocking with
    the first record written inside a running event loop."""

    def __init__(self, output: LineOutput) -> None:
        self.output = output
        self.loop: asyncio.AbstractEventLoop | None = None

    def write(self, text: str) -> int:
        output = self.output
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and loop is not self.loop:
            self.loop = loop
            if output.fd < 0:
                output.start(loop)
            else:
                output.loop = loop  # a later loop of the same process (`demo` then `serve`)
        output.write(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self) -> None:
        pass


_stderr: LineStream | None = None


def stderr_stream(shared: bool = False) -> LineStream:
    """The process's stderr as a `LineStream` (rule 6), one per process: the log's stream
    (`logging.basicConfig(stream=...)`) and the CLI's banners; `shared` in a worker (its
    siblings write to it too). What waits at exit gets `EXIT_WAIT_S`."""
    global _stderr
    if _stderr is None:
        output = LineOutput(sys.stderr.buffer, whole_lines=shared, name="log")
        atexit.register(output.close)
        _stderr = LineStream(output)
    return _stderr
