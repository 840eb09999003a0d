"""Which timeout of an exchange's current phase has passed: called by the server's sweep
through each client connection (`ServedConnection.check_deadline`), never by a timer per
exchange.

Rules: progress resets a phase's clock (a body that keeps moving never times out), and a
phase held back by the client (it is not reading, or the proxy paused its reading) is
not charged to the upstream. A timeout whose deadline passed while the proxy's own event
loop was stalled is charged to the proxy (`proxy.diagnosis.stalls`: checked only when a
timeout fires).
"""

from __future__ import annotations

import logging
from typing import Final

from ..base.text import duration_text
from ..diagnosis.classify import (
    DeadlineExpired,
    LoopStalled,
    UploadStalled,
    classify,
    stall_cause,
)
from ..diagnosis.faults import Fault, RequestProblem
from ..diagnosis.hops import PROXY_LOOP_STALLED
from ..diagnosis.record import Phase
from ..diagnosis.stalls import DEFER, stall_verdict, stalls_of
from .codec import PAUSE_UPLOAD
from .forwarder import Forwarder

log: Final = logging.getLogger("faultline")


def _stall(
    fw: Forwarder, error: DeadlineExpired, start: int, now: int, peer: str, instead: Fault | None
) -> LoopStalled | bool:
    """The proxy's own fault when its loop was stalled over `error`'s deadline (its clock
    started at `start`); True: not yet (the loop just came back from a stall and has not
    read what came during it); False: the peer's fault. A stall-free timeout costs a
    dictionary look-up here."""
    stall = stall_verdict(stalls_of(fw.ctx.pool.loop), start, error.limit_ns, now)
    if stall is DEFER:
        return True
    if stall is None:
        return False
    if instead is None:
        instead = classify(fw.phase, error)[0]
    log.warning(
        "exchange %s: the event loop was stalled for %s%s over the deadline of %s; "
        "charged to the proxy, not to %s as %s",
        fw.request_id,
        duration_text(stall.length),
        stall_cause(stall),
        error.setting,
        peer,
        instead.value,
    )
    fw.hints = (PROXY_LOOP_STALLED,)
    return LoopStalled(error.limit_ns, error.setting, stall, instead, peer)


def _expire(fw: Forwarder, error: DeadlineExpired, start: int, now: int) -> None:
    """`error`'s timeout passed: the upstream's fault, unless the proxy's loop stalled."""
    stalled = _stall(fw, error, start, now, "the upstream", None)
    if stalled is not True:
        fw.on_upstream_failed(stalled or error)


def check_deadline(fw: Forwarder, now: int) -> None:
    """Fire the timeout of `fw`'s current phase if it is due."""
    phase = fw.phase
    ctx = fw.ctx
    if phase is Phase.AWAIT_HEAD:
        if now - fw.progress_ns > ctx.response_headers_ns:
            error = DeadlineExpired(ctx.response_headers_ns, "timeouts.response_headers")
            _expire(fw, error, fw.progress_ns, now)
    elif phase is Phase.BODY:
        if fw.client_held or fw.down.write_paused:
            fw.progress_ns = now  # the client is slow (or its window shut), not the upstream
        elif fw.body_bytes_out != fw.progress:
            fw.progress = fw.body_bytes_out
            fw.progress_ns = now
        elif now - fw.progress_ns > ctx.upstream_read_ns:
            error = DeadlineExpired(ctx.upstream_read_ns, "timeouts.upstream_read")
            _expire(fw, error, fw.progress_ns, now)
    elif phase is Phase.SEND:
        pauses = fw.down.read_pauses
        if pauses == PAUSE_UPLOAD and not fw.request_complete:
            # Only the upstream holds the upload (it takes no more): its clock runs from
            # the last body byte it let the client send.
            if fw.body_bytes_in != fw.progress or not fw.progress_ns:
                fw.progress = fw.body_bytes_in
                fw.progress_ns = now
            elif now - fw.progress_ns > ctx.upstream_read_ns:
                error = UploadStalled(ctx.upstream_read_ns, "timeouts.upstream_read")
                _expire(fw, error, fw.progress_ns, now)
        elif fw.request_complete or pauses:
            fw.progress_ns = now
        elif fw.body_bytes_in != fw.progress:
            fw.progress = fw.body_bytes_in
            fw.progress_ns = now
        elif fw.progress_ns and now - fw.progress_ns > ctx.client_body_ns:
            error = DeadlineExpired(ctx.client_body_ns, "timeouts.client_body")
            client = Fault.HTTP_REQUEST_ERROR
            stalled = _stall(fw, error, fw.progress_ns, now, "the client", client)
            if stalled is True:
                return
            if stalled:
                fw.on_upstream_failed(stalled)  # releases the upstream as a timeout does
                return
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
            _expire(fw, DeadlineExpired(ctx.dns_ns, "timeouts.dns"), fw.t_dns, now)
    elif phase is Phase.CONNECT or phase is Phase.TLS:
        if fw.may_wait:
            limit = ctx.connect_ns + ctx.upstream_wait_ns
            setting = "timeouts.connect + upstream_wait"
        else:
            limit = ctx.connect_ns
            setting = "timeouts.connect"
        begun = fw.t_wait or fw.t_connect
        if now - begun > limit:
            fw.cancel_connect()
            _expire(fw, DeadlineExpired(limit, setting), begun, now)
    elif phase is Phase.POOL_WAIT and now - fw.t_pool > ctx.pool_wait_ns:
        ctx.pool.forget_waiter(fw)
        _expire(fw, DeadlineExpired(ctx.pool_wait_ns, "timeouts.pool_wait"), fw.t_pool, now)
