"""Build hook: with FAULTLINE_COMPILE=1, the data-plane modules are compiled by mypyc.

Everything else about the package is declared in pyproject.toml. The sources stay plain,
type-checked Python and run as they are when not compiled (an editable install for
development, `pip install .`); the container image builds the compiled modules
(Dockerfile) and .ci/run tests both builds. Measured with bench/hotpath.py under callgrind:
an exchange costs 39.3k instructions compiled against 77.1k interpreted (Proxy-Status and
Server-Timing on), 45.4k against 88.9k with the access log; bench/RESULTS.md has what that
is worth against nginx. Module-level constants are `Final` in these modules: compiled, a
name that is not is looked up in the module's dict at every use.
"""

import os

from setuptools import setup

# The per-exchange path, and nothing that starts a process, parses a configuration or
# serves the admin port: only these run once per request.
COMPILED = [
    "proxy/accesslog.py",
    "proxy/downstream.py",
    "proxy/exchange.py",
    "proxy/forward.py",
    "proxy/headers.py",
    "proxy/memo.py",
    "proxy/outbox.py",
    "proxy/stats.py",
    "proxy/upstream.py",
]

ext_modules = []
if os.environ.get("FAULTLINE_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
