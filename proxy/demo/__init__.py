"""The demo origin: a built-in HTTP server that produces, on request, every fault Faultline names.

`faultline demo` runs it behind the proxy so a user can click through what each failure
looks like from the client's side and what Faultline says about it.

Rules:
- `ROUTES` is the one description of the demo: the landing page is rendered from it, and the
  end-to-end tests drive every entry through the proxy and compare what the proxy reports
  with `expect_*`. The expectations assume the demo's proxy settings:
  `timeouts.response_headers` 2s, `timeouts.upstream_read` 2s, and the default
  `limits.max_response_header_bytes` (64 KiB).
- Normal routes are ordinary aiohttp handlers. Byte-level routes write raw bytes to the
  connection's transport and close or abort it themselves; they then return
  `_RawBytesSent`, whose prepare/write_eof do nothing, so aiohttp adds no framing of its
  own, does not keep the connection alive and logs nothing.
- No deliberate misbehaviour produces a traceback in aiohttp's logs: a client that leaves
  mid-response is normal here (the proxy gives up on /hang, /stall, ...), so it cancels the
  handler (`handler_cancellation`) or is swallowed by `_quiet_client_disconnects`.
- Every wait is bounded: the holding routes give up after `_HOLD_LIMIT_S`, and
  `DemoOrigin.close()` releases all of them at once, so closing takes well under a second.
- Listens where told, 127.0.0.1 by default; the landing page is self-contained (no CDN).

Modules: `routes` (the table), `wire` (what the handlers share: raw bytes on the transport,
bounded holds), `handlers` (normal traffic, the origin's own errors, errors made behind it),
`broken` (slow answers and byte-level misbehaviour), `landing` (the page, rendered once from
`routes` into `landing.html`), `app` (the aiohttp application and its runner), `api` (the
demo's second upstream, a small JSON API the demo routes `/api/` to).
"""

from .api import start_demo_api
from .app import DemoOrigin, make_demo_app, start_demo_origin
from .routes import ROUTES, DemoRoute

__all__ = [
    "ROUTES",
    "DemoOrigin",
    "DemoRoute",
    "make_demo_app",
    "start_demo_api",
    "start_demo_origin",
]
