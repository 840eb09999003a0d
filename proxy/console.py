"""Readable, coloured access-log lines for a human at a terminal.

Rule: one line per exchange: time, status, method, path, duration, who produced it, and
for a fault its token and the first thing to check (from the taxonomy).
"""

from __future__ import annotations

from typing import Any

from .faults import Fault, info

RESET = "\x1b[0m"
DIM = "\x1b[2m"
BOLD = "\x1b[1m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
MAGENTA = "\x1b[35m"
CYAN = "\x1b[36m"


def _status_colour(status: int) -> str:
    if status >= 500:
        return RED
    if status >= 400:
        return YELLOW
    if status >= 300:
        return CYAN
    return GREEN


def pretty_line(record: dict[str, Any], colour: bool = True) -> bytes:
    """One human line for an access-log record."""
    c = (lambda code: code) if colour else (lambda code: "")
    status = record["status"]
    clock = record["time"][11:19]
    source = record["source"]
    who = {"origin": "origin", "proxy": "PROXY", "client": "client"}[source]
    who_colour = MAGENTA if source == "proxy" else (DIM if source == "origin" else YELLOW)
    line = (
        f"{c(DIM)}{clock}{c(RESET)} {c(BOLD)}{c(_status_colour(status))}{status}{c(RESET)} "
        f"{record['method'] or '-':<6} {record['path'] or '-'} "
        f"{c(DIM)}{record['duration_ms']:.1f}ms{c(RESET)} {c(who_colour)}{who}{c(RESET)}"
    )
    error = record.get("error")
    if error:
        row = info(Fault(error))
        line += f" {c(RED)}{error}{c(RESET)}"
        if record.get("details"):
            line += f" {c(DIM)}({record['details']}){c(RESET)}"
        line += f"\n         {c(YELLOW)}↳ {row.advice}{c(RESET)}"
    if record.get("retried"):
        line += f" {c(DIM)}[retried]{c(RESET)}"
    return (line + "\n").encode()
