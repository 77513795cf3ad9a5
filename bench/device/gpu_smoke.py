"""On the GPU machine, before the real model is there: the Python API with every
layer on the GPU on random-weight models (tiny llama, tiny gemma3 iSWA), after
libstdc++ and a C++ extension are mapped (the issue-15 crash), for every format
family; prints one line per case and exits non-zero on any failure."""

import ctypes
import ctypes.util
import sys
import traceback

ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
try:
    import torch  # noqa: F401  (a C++ extension, mapped before our libraries)
except ImportError:
    pass

import numpy as np

import pyllm_kv
from pyllm_kv import shape_model
from pyllm_kv.model_info import read_model_info

tiny = shape_model.write_shape_model("/tmp/tiny.gguf", shape_model.resolve_spec("tiny"), "q8_0")
gem = shape_model.write_shape_model("/tmp/tiny-gemma3.gguf", shape_model.resolve_spec("tiny-gemma3"), "q8_0", seed=3)
read_model_info(tiny)  # gguf-py first, as load() does
fails = 0
for path in (tiny, gem):
    ref = None
    for k, v in (("f16", "f16"), ("kv4", "kv4"), ("squat4", "kv4"), ("deco4", "deco4"), ("kv2", "kv3")):
        try:
            out = {}
            for ngl in (0, -1):
                m = pyllm_kv.load(path, cache_k=k, cache_v=v, n_ctx=256, n_gpu_layers=ngl, n_threads=4)
                toks = list(range(300, 380))
                m.llama.reset()
                m.llama.eval(toks)
                ptr = pyllm_kv._libs.llama_cpp().llama_get_logits_ith(m.llama.ctx, -1)
                out[ngl] = np.ctypeslib.as_array(ptr, shape=(m.llama.n_vocab(),)).astype(np.float64)
                gen = m.generate("hello world", max_tokens=4) if ngl else ""
                m.close()
            d = np.abs(out[0] - out[-1]).max() / (np.abs(out[0]).max() + 1e-9)
            ok = np.all(np.isfinite(out[-1]))
            print(f"{path.name} {k}/{v}: GPU logits finite={ok}, max rel diff CPU vs GPU {d:.3g}, generate {gen!r}")
            fails += not ok
        except Exception:
            fails += 1
            print(f"{path.name} {k}/{v}: FAILED")
            traceback.print_exc()
sys.exit(1 if fails else 0)
