"""bench/turns.py reads loop turns out of perf's epoll_wait tracepoints, per thread, the same
way for every proxy: what a turn is must not drift (the p99 bar is read against nginx's)."""

from __future__ import annotations

import pytest

from support import load_bench_module


def load_turns():
    return load_bench_module("turns")


# `perf script -F tid,time,event,trace` as perf 6 prints it: nginx's epoll_wait and libuv's
# epoll_pwait, two threads of one process interleaved.
W = "epfd: 0x00000007, events: 0x562e3dbb5eb0, maxevents: 0x00000200, timeout: 0x0000ea5f"
PW = (
    "epfd: 0x00000003, events: 0x7ffeda719e10, maxevents: 0x00000400, timeout: 0x0000000f, "
    "sigmask: 0x00000000, sigsetsize: 0x00000008"
)
SCRIPT = f"""\
24486 48800.973975: syscalls:sys_enter_epoll_wait: {W}
24486 48800.973988:  syscalls:sys_exit_epoll_wait: 0x20
 9001 48800.974000: syscalls:sys_enter_epoll_pwait: {PW}
24486 48800.974145: syscalls:sys_enter_epoll_wait: {W}
 9001 48800.974150:  syscalls:sys_exit_epoll_pwait: 0x1
24486 48800.975119:  syscalls:sys_exit_epoll_wait: 0x6
 9001 48800.974160: syscalls:sys_enter_epoll_pwait: {PW}
24486 48800.975419: syscalls:sys_enter_epoll_wait: {W}
24486 48800.975500:  syscalls:sys_exit_epoll_wait: 0x2
"""


def test_a_turn_runs_from_a_polls_return_to_the_next_poll_of_the_busiest_thread():
    turns = load_turns()
    spans, events = turns.turns_of(SCRIPT)
    # 24486: 973.988 -> 974.145 (157 us) and 975.119 -> 975.419 (300 us); its last poll has
    # not been followed by another, so it is no turn. 9001 spent 10 us in its one turn.
    assert spans == pytest.approx([157.0, 300.0], abs=0.01)
    assert events == [0x20, 6, 2]


def test_no_tracepoint_lines_no_turns():
    turns = load_turns()
    assert turns.turns_of("perf: nothing recorded\n") == ([], [])
