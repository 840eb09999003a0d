"""The control channel between the supervisor and one worker: a socket pair, one end in
each process, carrying framed messages (a kind byte, a length, a pickle).

Kinds: supervisor -> worker `C` (the configuration, first), `S` (send your state);
worker -> supervisor `R` (ready: serving), `E` (could not start: the reason, one line),
`S` (a state, answering `S`, in order), `F` (the final state, after the drain).
Both ends are this program, started by the supervisor, so pickle is safe here.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("!cI")

CONFIG: Final = b"C"
STATE: Final = b"S"
READY: Final = b"R"
FAILED: Final = b"E"
FINAL: Final = b"F"


def send(writer: asyncio.StreamWriter, kind: bytes, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(HEADER.pack(kind, len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> tuple[bytes, Any]:
    """The next message (IncompleteReadError at the other end's exit)."""
    kind, size = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, pickle.loads(await reader.readexactly(size))
