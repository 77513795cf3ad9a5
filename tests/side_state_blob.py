"""Read pyllm-kv's side-state blobs out of a llama.cpp state (tests only).

llama.cpp writes each KV cache's cells and then, for cache types with side
state, our blob (native/llama/side_state.cpp, "session state", version 3):
a u64 size, then the header (magic "PKVS", version, slot count, settings) and
per slot (il, is_v, method, byte count) plus the method's bytes. An iSWA model has two
caches, so two blobs. This parser lets tests check what the native side state
holds (which layers, fitted or not) without a debugging API in the library.
"""

from __future__ import annotations

import struct
from typing import Dict, List

MAGIC = b"PKVS"
VERSION = 3
HEADER = struct.Struct("<4sIIIIIIIIf")  # magic, version, n_slots, deco g, variant, hadamard, rank, norm, on_deco, lambda
SLOT = struct.Struct("<IIII")  # il, is_v, method, bytes
METHODS = {1: "deco", 2: "squat", 3: "center"}


def parse_blob(buf: bytes, off: int) -> "tuple[List[Dict], int]":
    """Slots of the blob whose header starts at buf[off]; returns (slots, end offset)."""
    magic, version, n_slots, g, *_ = HEADER.unpack_from(buf, off)
    assert magic == MAGIC and version == VERSION
    p = off + HEADER.size
    slots = []
    for _ in range(n_slots):
        il, is_v, method, nbytes = SLOT.unpack_from(buf, p)
        p += SLOT.size
        name = METHODS[method]
        if name == "squat":  # u32 n_head, u32 d, a fitted flag per head, U
            n_head, _d = struct.unpack_from("<II", buf, p)
            heads = [bool(b) for b in buf[p + 8:p + 8 + n_head]]
        else:                # deco, center: u32 fitted, then the matrices / the mean
            heads = [bool(struct.unpack_from("<I", buf, p)[0])]
        p += nbytes
        slots.append({"il": il, "v": bool(is_v), "method": name, "fitted": all(heads), "heads": len(heads)})
    return slots, p


def side_blobs(state: bytes) -> List[List[Dict]]:
    """Every side-state blob in a llama.cpp state, in order (one per KV cache)."""
    out, start = [], 0
    tag = MAGIC + struct.pack("<I", VERSION)
    while True:
        i = state.find(tag, start)
        if i < 0:
            return out
        (size,) = struct.unpack_from("<Q", state, i - 8)
        slots, end = parse_blob(state, i)
        assert end - i == size, f"blob at {i}: parsed {end - i} bytes, size field says {size}"
        out.append(slots)
        start = end
