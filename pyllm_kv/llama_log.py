"""What llama.cpp logs while it creates a context, captured.

llama.cpp reports two things only in its log: why a context could not be made
(e.g. ``pyllm-kv: cache type squat4 needs its side-state hooks ...``, thrown
inside the constructor and turned into a NULL context), and how big the KV
caches it allocated are (``llama_kv_cache: size = ... (N cells, L layers, ...)``,
one line per cache; an iSWA model has two). :func:`captured` records the lines
while a block runs and still forwards them to llama-cpp-python's own logger, so
``verbose=True`` prints what it always printed.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

from . import _libs

_CACHE_RE = re.compile(r"llama_kv_cache: size = .*?\(\s*(\d+) cells,\s*(\d+) layers")
# "llama_kv_cache:  RPC0[10.0.0.2:50052] KV buffer size = 1.23 MiB": where the K/V rows live
_KV_BUFFER_RE = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s*([0-9.]+) MiB")


_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR (ggml.h of the pinned tree)


@dataclass
class LlamaLog:
    lines: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)  # lines logged at error level

    def text(self) -> str:
        return "".join(self.lines)

    def failure(self) -> "str | None":
        """Why llama.cpp refused, as it logged it: our native code's message
        ('pyllm-kv: ...') if there is one, else llama.cpp's last error line."""
        for line in self.errors:
            i = line.find("pyllm-kv:")
            if i >= 0:
                return line[i:].strip()
        return self.errors[-1].strip() if self.errors else None

    def kv_caches(self) -> List[Tuple[int, int]]:
        """(cells, layers) of every KV cache llama.cpp allocated, in log order."""
        return [(int(c), int(n)) for c, n in _CACHE_RE.findall(self.text())]

    def kv_buffers(self) -> List[Tuple[str, float]]:
        """(buffer, MiB) of every KV buffer llama.cpp allocated: CPU, CUDA0, RPC0[host:port], ..."""
        return [(name, float(mib)) for name, mib in _KV_BUFFER_RE.findall(self.text())]


@contextmanager
def captured() -> Iterator[LlamaLog]:
    lc = _libs.llama_cpp()
    from llama_cpp import _logger  # noqa: PLC0415  (llama-cpp-python's callback, to forward to)

    log = LlamaLog()

    @lc.llama_log_callback
    def _record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        log.lines.append(line)
        if level == _LEVEL_ERROR:
            log.errors.append(line)
        _logger.llama_log_callback(level, text, user_data)

    lc.llama_log_set(_record, ctypes.c_void_p(0))
    try:
        yield log
    finally:
        lc.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
