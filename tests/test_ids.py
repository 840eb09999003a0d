"""Every test id is stable and plain, so that it can be named on a command line, passed back
to pytest (mutmut does) and compared between runs: the whole suite (slow tests included) is
collected twice, under two hash seeds, and must give the same ids; no id may hold a control
character, a raw byte or the escape pytest writes for one (`\\t`, `\\x1f`, `\\u00e9`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import ROOT

# Printable ASCII only, and no backslash: pytest writes a control character or a non-ASCII
# byte of a parameter as an escape (`a\\tb`, `\\xff`), which a shell and `-k` mangle.
PLAIN_ID = re.compile(r"[\x20-\x5b\x5d-\x7e]+")


def _collect(seed: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )


def _ids(proc: subprocess.Popen[bytes]) -> list[bytes]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out[-2000:], err[-2000:])
    ids = [line for line in out.splitlines() if b"::" in line]
    assert len(ids) > 500, out[-2000:]
    return ids


def test_collected_ids_are_the_same_twice_and_plain():
    first, second = _collect("1"), _collect("2")
    ids, again = _ids(first), _ids(second)
    assert ids == again, sorted(set(ids) ^ set(again))[:20]
    assert len(set(ids)) == len(ids)
    bad = [line for line in ids if not PLAIN_ID.fullmatch(line.decode("latin-1"))]
    assert bad == [], bad[:20]
