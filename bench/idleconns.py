#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT, send one GET on each, then hold them.

Used by bench.py for the idle-connections scenario; stdlib only. Protocol on stdio:
  stdout "READY ok=N failed=N elapsed_s=X limit=N"  once every connection has had its answer;
  stdin  any line                                   -> check: a second GET, with
                                                        "Connection: close", on every one;
  stdout "OPEN n"                                    n = connections that answered it; exit.
Requests are sent at most --concurrency at a time, so a proxy's upstream pool stays small and
what is measured is the cost of idle downstream connections. The whole run is bounded by
--timeout seconds (the process exits by itself, even if nobody reads or writes its stdio).
"""

import argparse
import asyncio
import os
import resource
import signal
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: faultline-bench-idle\r\n\r\n"
# The check asks the server to close: the server then closes first and keeps the TIME_WAIT,
# so 10,000 client ports do not linger in the ephemeral range (where fixed ports live too).
LAST_REQUEST = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards `wanted`; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # only works with CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, bool]:
    """Send `request`, read the whole response; return (status, server wants to close)."""
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = head.split(b" ", 2)[1]
    length = 0
    close = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
    await asyncio.wait_for(reader.readexactly(length), 10)
    return status, close


ERRORS = (
    OSError,
    ValueError,
    IndexError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    asyncio.TimeoutError,
)


async def open_one(port: int, sem: asyncio.Semaphore, held: list, errors: list) -> None:
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (TimeoutError, OSError) as exc:
            errors.append(f"connect: {exc!r}")
            return
        try:
            status, close = await exchange(reader, writer, REQUEST)
        except ERRORS as exc:
            errors.append(f"request: {exc!r}")
            writer.close()
            return
        if status != b"200" or close:
            errors.append(f"status {status!r} close={close}")
            writer.close()
            return
        held.append((reader, writer))


async def check_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    sem: asyncio.Semaphore,
    answered: list,
) -> None:
    """Is the held connection still usable? Ends it, letting the server close first."""
    try:
        async with sem:
            if reader.at_eof():
                return
            status, _ = await exchange(reader, writer, LAST_REQUEST)
        if status == b"200":
            answered.append(1)
        await asyncio.wait_for(reader.read(), 2)  # the server's FIN, if it sends one
    except ERRORS:
        pass
    finally:
        writer.close()


async def main_async(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    limit = raise_nofile(a.conns + 64)
    n = min(a.conns, limit - 64)
    sem = asyncio.Semaphore(a.concurrency)
    held: list = []
    errors: list = []
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(a.port, sem, held, errors) for _ in range(n)))
    print(
        f"READY ok={len(held)} failed={len(errors) + a.conns - n} "
        f"elapsed_s={time.monotonic() - t0:.2f} limit={limit}",
        flush=True,
    )
    for e in sorted(set(errors))[:5]:
        print(f"# error sample: {e}", file=sys.stderr, flush=True)
    # Wait for the harness to have measured; stdin EOF counts as "go on".
    await loop.run_in_executor(None, sys.stdin.readline)
    answered: list = []
    try:
        await asyncio.wait_for(
            asyncio.gather(*(check_one(r, w, sem, answered) for r, w in held)), a.check_timeout
        )
    except TimeoutError:
        print(f"# check: gave up after {a.check_timeout} s", file=sys.stderr, flush=True)
    print(f"OPEN {len(answered)}", flush=True)
    await asyncio.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=180, help="hard bound on the whole run (s)")
    ap.add_argument("--check-timeout", type=float, default=60, help="bound on the check (s)")
    a = ap.parse_args()
    # os._exit: a thread may sit in stdin.readline(), which asyncio.run would wait for.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(max(1, int(a.timeout)))
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
