"""The client side of tests/test_rpc.py, run in a process of its own.

RPC servers registered with ggml stay in its device list for the life of the
process, and a refused handshake inside llama.cpp aborts the process: neither
must reach pytest's. Reads one JSON job from argv[1], prints one JSON result
as the last line of stdout.

  {"mode": "run", "model": "path.gguf", "load": {...load() keywords...}, "prompt_logits": "...",
   "runs": [{"k": "squat4", "v": "squat4", "env": {"PYLLM_KV_CENTER": "k"}}, ...]}
    -> per run: greedy text, next-token logits (float32, base64) and the KV buffers
  {"mode": "refused", "model": "path.gguf", "servers": "h:p", "env": {...}}
    -> the error load() raised (type and message), or none
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from typing import Any, Dict, Iterator

PROMPT_GEN = "The capital of France is"
# a prefill of several tokens: the side state is fitted from it
PROMPT_LOGITS = "Paris is the capital of France. The river that flows through it is called the"
N_TOKENS = 16


@contextlib.contextmanager
def environment(env: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(job: Dict[str, Any]) -> Dict[str, Any]:
    import pyllm_kv  # noqa: PLC0415

    out = []
    for r in job["runs"]:
        with environment(r.get("env", {})), pyllm_kv.load(
                job["model"], cache_k=r["k"], cache_v=r["v"], n_ctx=256, n_threads=1, **job["load"]) as m:
            prompt = job.get("prompt_logits", PROMPT_LOGITS)
            text = m.generate(PROMPT_GEN, max_tokens=N_TOKENS)
            logits = m.logits(prompt)
            out.append({"run": r, "text": text, "kv_buffers": m.kv_buffers,
                        "n_prompt": len(m.tokenize(prompt)),
                        "logits": base64.b64encode(logits.astype("<f4").tobytes()).decode()})
    return {"results": out}


def refused(job: Dict[str, Any]) -> Dict[str, Any]:
    import pyllm_kv  # noqa: PLC0415

    try:
        with environment(job.get("env", {})):
            pyllm_kv.load(job["model"], n_ctx=256, n_threads=1, rpc_servers=job["servers"], n_gpu_layers=20).close()
    except Exception as exc:  # noqa: BLE001  (the test checks the type)
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    result = run(job) if job["mode"] == "run" else refused(job)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
