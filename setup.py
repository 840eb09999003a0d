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
    "proxy/base/gauges.py",
    "proxy/base/memo.py",
    "proxy/base/text.py",
    "proxy/diagnosis/record.py",
    "proxy/forward/codec.py",
    "proxy/forward/context.py",
    "proxy/forward/deadlines.py",
    "proxy/forward/fields.py",
    "proxy/forward/forwarder.py",
    "proxy/forward/heads.py",
    "proxy/forward/outbox.py",
    "proxy/forward/pool.py",
    "proxy/forward/state.py",
    "proxy/http1/client.py",
    "proxy/http1/errors.py",
    "proxy/http1/headers.py",
    "proxy/http1/origin.py",
    "proxy/http1/reader.py",
    "proxy/http1/request.py",
    "proxy/http1/respond.py",
    "proxy/http2/client.py",
    "proxy/http2/origin.py",
    "proxy/http2/origin_stream.py",
    "proxy/http2/request.py",
    "proxy/http2/respond.py",
    "proxy/http2/stream.py",
    "proxy/telemetry/accesslog.py",
    "proxy/telemetry/breakdown.py",
    "proxy/telemetry/histogram.py",
    "proxy/telemetry/sink.py",
    "proxy/telemetry/stats.py",
]

ext_modules = []
if os.environ.get("FAULTLINE_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
