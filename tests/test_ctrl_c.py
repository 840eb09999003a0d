"""Ctrl-C on a terminal with a browser's WebSocket (a dev server's HMR socket) open through
the proxy: the proxy exits at once, not at the end of timeouts.drain (a tunnel has no
response to wait for; it never ends by itself)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import subprocess
import sys
import termios
import time

from proxy.demo import start_demo_origin

from support import LOOPBACK, ROOT, free_port, read_terminal

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: dev\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _controlling_terminal() -> None:  # in the child: the pty is its terminal, as in a shell
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def test_ctrl_c_with_a_websocket_open_exits_without_waiting_for_the_drain():
    origin = await start_demo_origin()
    master, slave = pty.openpty()
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", origin.url,
         "--listen", f"{LOOPBACK}:{port}", "--admin", f"{LOOPBACK}:{admin_port}"],
        cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FAULTLINE_TIMEOUTS_DRAIN": "5s"},
    )  # fmt: skip
    os.close(slave)
    try:
        await asyncio.to_thread(read_terminal, master, lambda out: b"listening on" in out, 15)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        await asyncio.sleep(0.3)
        started = time.monotonic()
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        code = await asyncio.to_thread(proc.wait, 10)
        took = time.monotonic() - started
        assert code == 0
        # The drain is 5 s; a fixed wait for it is what this catches.
        assert took < 1.0, f"Ctrl-C took {took:.2f} s with a WebSocket open"
        writer.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
        await origin.close()
