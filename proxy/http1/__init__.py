"""The HTTP/1.1 codec, both sides: a client connection (`client`: parsing and ordering,
`request`: the request head and its rules, `respond`: every byte sent back) and an origin
connection (`origin`), with the header rules they share (`headers`) and llhttp's error
words (`errors`).

Rule: the two sides never import each other (import-linter holds it); they meet in the
core (`proxy.forward`), which they implement the seam of (`proxy.forward.codec`).
"""
