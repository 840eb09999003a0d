"""Where finished exchange records go: the counters and windows behind /stats (`stats`),
Prometheus families (`metrics`), the access log (`accesslog`), the terminal's lines and
burst summary (`console`), and the batching sink the core is given (`sink`).

Rule: a sink only reads finished records; nothing here reaches back into a codec or the
forwarding core (import-linter holds it: the core never imports this package either).
"""
