"""The HTTP/2 codec (h2, python-hyper, holds the frame and HPACK state machine): the client
side for connections that open with the HTTP/2 preface (`client`), each stream's request
head (`request`) and response (`respond`).

Rule: a peer of `proxy.http1` (neither imports the other: import-linter holds it); it meets
the origin codecs only in the core (`proxy.forward`), through `proxy.forward.codec`.
"""
