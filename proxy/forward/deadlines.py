"""Which timeout of an exchange's current phase has passed: called by the server's sweep
through each client connection (`ServedConnection.check_deadline`), never by a timer per
exchange.

Rule: progress resets a phase's clock (a body that keeps moving never times out), and a
phase held back by the client (it is not reading, or the proxy paused its reading) is
not charged to the upstream.
"""

from __future__ import annotations

from ..base.text import duration_text
from ..diagnosis.classify import DeadlineExpired, UploadStalled
from ..diagnosis.faults import RequestProblem
from ..diagnosis.record import Phase
from .codec import PAUSE_UPLOAD
from .forwarder import Forwarder


def check_deadline(fw: Forwarder, now: int) -> None:
    """Fire the timeout of `fw`'s current phase if it is due."""
    phase = fw.phase
    ctx = fw.ctx
    if phase is Phase.AWAIT_HEAD:
        if now - fw.progress_ns > ctx.response_headers_ns:
            fw.on_upstream_failed(
                DeadlineExpired(ctx.response_headers_ns, "timeouts.response_headers")
            )
    elif phase is Phase.BODY:
        if fw.client_held or fw.down.write_paused:
            fw.progress_ns = now  # the client is slow (or its window shut), not the upstream
        elif fw.body_bytes_out != fw.progress:
            fw.progress = fw.body_bytes_out
            fw.progress_ns = now
        elif now - fw.progress_ns > ctx.upstream_read_ns:
            fw.on_upstream_failed(DeadlineExpired(ctx.upstream_read_ns, "timeouts.upstream_read"))
    elif phase is Phase.SEND:
        pauses = fw.down.read_pauses
        if pauses == PAUSE_UPLOAD and not fw.request_complete:
            # Only the upstream holds the upload (it takes no more): its clock runs from
            # the last body byte it let the client send.
            if fw.body_bytes_in != fw.progress or not fw.progress_ns:
                fw.progress = fw.body_bytes_in
                fw.progress_ns = now
            elif now - fw.progress_ns > ctx.upstream_read_ns:
                fw.on_upstream_failed(UploadStalled(ctx.upstream_read_ns, "timeouts.upstream_read"))
        elif fw.request_complete or pauses:
            fw.progress_ns = now
        elif fw.body_bytes_in != fw.progress:
            fw.progress = fw.body_bytes_in
            fw.progress_ns = now
        elif fw.progress_ns and now - fw.progress_ns > ctx.client_body_ns:
            fw.on_request_error(
                RequestProblem.TIMEOUT,
                f"client sent no body bytes for {duration_text(ctx.client_body_ns)} "
                "(timeouts.client_body)",
            )
        elif not fw.progress_ns:
            fw.progress_ns = now
    elif phase is Phase.DNS:
        if now - fw.t_dns > ctx.dns_ns:
            fw.cancel_connect()
            fw.on_upstream_failed(DeadlineExpired(ctx.dns_ns, "timeouts.dns"))
    elif phase is Phase.CONNECT or phase is Phase.TLS:
        if fw.may_wait:
            limit = ctx.connect_ns + ctx.upstream_wait_ns
            setting = "timeouts.connect + upstream_wait"
        else:
            limit = ctx.connect_ns
            setting = "timeouts.connect"
        if now - (fw.t_wait or fw.t_connect) > limit:
            fw.cancel_connect()
            fw.on_upstream_failed(DeadlineExpired(limit, setting))
    elif phase is Phase.POOL_WAIT and now - fw.t_pool > ctx.pool_wait_ns:
        ctx.pool.forget_waiter(fw)
        fw.on_upstream_failed(DeadlineExpired(ctx.pool_wait_ns, "timeouts.pool_wait"))
