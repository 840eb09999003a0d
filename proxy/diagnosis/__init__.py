"""What went wrong and who is to blame, as tables and pure functions: the fault taxonomy
(`faults`), failure -> fault (`classify`), the exchange record (`record`), and what an
origin's error response says about the hops behind it (`hops`).

Rule: nothing here does I/O or knows a protocol library: no asyncio, socket, ssl, uvloop,
httptools, h2 or aiohttp (import-linter holds it), and nothing of `proxy` outside this
package but `proxy.base`. Everything is tested without a network.
"""
