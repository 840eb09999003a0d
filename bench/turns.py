#!/usr/bin/env python3
"""How long a server's event loop is away from the kernel between two polls, measured the
same way for every server: nginx, HAProxy and Faultline alike.

A turn is the time from one epoll_wait returning to the next epoll_wait being entered: the
loop handling what that poll returned (and its timers and callbacks). An event that becomes
ready during a turn waits for the rest of it; a timer due during a turn fires after it. So
the turns are the one loop-lag figure that can be taken from outside, with the same
instrument, for a proxy that has no loop-lag metric of its own (nginx) and for one that has
(Faultline's `faultline_event_loop_lag_seconds`, whose sample is the tail of a turn).

How: `perf record` of the syscall tracepoints sys_enter/sys_exit of epoll_wait and
epoll_pwait (two events a turn: the overhead is a few per cent of one syscall a turn) on the
server's processes, then `perf script`. Per thread; the busiest thread (the most time in
turns) is the server's loop. Needs perf and the permission to trace (root, or
kernel.perf_event_paranoid <= -1 and a readable tracefs); `available()` says whether it works.

    turns.py --pid PID[,PID...] [--seconds S]    trace a running server for S seconds

Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

EVENTS = ",".join(
    f"syscalls:sys_{edge}_{call}"
    for call in ("epoll_wait", "epoll_pwait")
    for edge in ("enter", "exit")
)
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_epoll_p?wait:\s*(\S*)")


def available() -> str | None:
    """None if turns can be traced here, else why not."""
    if not shutil.which("perf"):
        return "perf is not installed (Debian: linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            ["perf", "record", "-q", "-e", EVENTS, "-o", os.path.join(tmp, "p"), "--", "true"],
            capture_output=True,
            text=True,
        )
    if probe.returncode:
        return f"perf cannot trace syscalls here: {probe.stderr.strip()[-200:]}"
    return None


def record(pids: list[int], seconds: float, path: str, delay: float = 0.0) -> subprocess.Popen:
    """Start tracing `pids` into `path`, from `delay` to `seconds` seconds from now; wait for
    the returned process."""
    argv = ["perf", "record", "-q", "-e", EVENTS, "-p", ",".join(map(str, pids)), "-o", path]
    argv += ["-D", str(int(delay * 1000))] if delay else []
    argv += ["--", "sleep", f"{seconds:g}"]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def turns_of(script: str) -> tuple[list[float], list[int]]:
    """The busiest thread's turns (µs) and the events each of its polls returned, from
    `perf script -F tid,time,event,trace` output."""
    per: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    back: dict[str, float] = {}  # tid -> when its last poll returned
    for line in script.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        tid, t, edge, ret = m.group(1), float(m.group(2)), m.group(3), m.group(4)
        spans, events = per[tid]
        if edge == "exit":
            back[tid] = t
            events.append(int(ret, 16) if ret.startswith("0x") else int(ret or 0))
        elif tid in back:
            spans.append((t - back.pop(tid)) * 1e6)
    if not per:
        return [], []
    return max(per.values(), key=lambda te: sum(te[0]))


def summarize(path: str) -> dict:
    """The busiest thread's turns in `path`: count, p50/p99/p99.9/max in ms, events a poll."""
    script = subprocess.run(
        ["perf", "script", "-i", path, "-F", "tid,time,event,trace"],
        capture_output=True,
        text=True,
    ).stdout
    spans, events = turns_of(script)
    if not spans:
        return {"error": "no turns traced"}
    spans.sort()
    out: dict = {"turns": len(spans)}
    for key, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
        out[key] = round(spans[min(len(spans) - 1, int(q * len(spans)))] / 1e3, 4)
    out["max"] = round(spans[-1] / 1e3, 4)
    out["events"] = round(sum(events) / len(events), 1) if events else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", required=True, help="the server's process ids, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    why = available()
    if why:
        print(why, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "turns.data")
        proc = record([int(p) for p in a.pid.split(",")], a.seconds, path)
        _, err = proc.communicate()
        if proc.returncode:
            print(err.decode(errors="replace").strip(), file=sys.stderr)
            return 1
        print(json.dumps(summarize(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
