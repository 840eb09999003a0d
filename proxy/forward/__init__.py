"""The protocol-agnostic forwarding core: one exchange's state machine (`forwarder`), the
upstream pool and how a connection is opened (`pool`), phase deadlines (`deadlines`), the
values shared by every connection (`context`), the write scheduler (`outbox`), and the
seam the protocol codecs implement (`codec`).

Rule: nothing here imports a codec (`proxy.http1`) or `proxy.telemetry`; the codecs call
in through `Forwarder` and are called through the protocols of `codec`, and finished
records leave through the sink `proxy.server` wires into `ForwardContext`.
"""
