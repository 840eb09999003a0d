"""One worker process, started by the supervisor (`main`: CONTROL_FD LISTEN_FD INDEX). It
serves its own listen socket of the port (SO_REUSEPORT, bound by the supervisor), with no
admin port of its own, and answers the supervisor's requests for its counts.

Life: the configuration arrives first on the control channel; `R` once serving (or `E` and
exit 2 when it cannot start). SIGTERM (forwarded by the supervisor) drains it as
CONTRACT.md's lifecycle says; so does the channel's end (the supervisor is gone: no worker
outlives it). After the drain it sends its final counts (`F`) and exits 0. It runs in a
session of its own, so a terminal's Ctrl-C reaches only the supervisor, which forwards it
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time

from ..server import ProxyServer, StartupError, tune_gc
from ..telemetry.logoutput import stderr_stream
from ..telemetry.merge import state_of
from ..telemetry.metrics import ProtocolSplit
from . import channel


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: ProxyServer
) -> None:
    """Answer state requests until the channel ends; then drain (the supervisor is gone)."""
    assert server.telemetry is not None and server.ctx is not None
    try:
        while True:
            kind, _ = await channel.receive(reader)
            if kind == channel.STATE:
                state = state_of(server.telemetry, server.pool_counts())
                channel.send(writer, channel.STATE, state)
    except (asyncio.IncompleteReadError, ConnectionError):
        server.request_stop()


async def serve(control_fd: int, listen_fd: int) -> int:
    control = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_connection(sock=control)
    kind, config = await channel.receive(reader)
    assert kind == channel.CONFIG
    server = ProxyServer(
        config,
        sys.stdout.buffer,
        sock=socket.socket(fileno=listen_fd),
        admin=False,
        whole_lines=True,
    )
    try:
        await server.start()
    except StartupError as exc:
        channel.send(writer, channel.FAILED, str(exc))
        await writer.drain()
        return 2
    assert server.telemetry is not None and server.ctx is not None
    ProtocolSplit.of(server.telemetry)  # the h2 share, as the admin's registry would count it
    tune_gc()
    server.install_signal_handlers()
    channel.send(writer, channel.READY, {"pid": os.getpid(), "started_at": time.time()})
    answering = asyncio.get_running_loop().create_task(_answer(reader, writer, server))
    await server.serve_until_stopped()
    answering.cancel()
    with contextlib.suppress(ConnectionError, RuntimeError):
        channel.send(writer, channel.FINAL, state_of(server.telemetry, (0, 0)))
        await writer.drain()
    writer.close()
    return 0


def main() -> int:
    import uvloop

    control_fd, listen_fd, index = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    logging.basicConfig(
        stream=stderr_stream(shared=True),
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s",
    )
    try:
        return uvloop.run(serve(control_fd, listen_fd))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
