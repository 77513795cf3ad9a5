"""The Python API with layers on the GPU, variant by variant, each in its own
process (a crash in one does not hide the others): what llama-cpp-python's
Llama needs to load and run a model with n_gpu_layers > 0 on this build.

    python3 bench/device/py_gpu_check.py MODEL.gguf

Prints one line per variant (exit status, last lines of llama.cpp's log)."""
import subprocess
import sys

VARIANTS = {
    "cpu (n_gpu_layers=0)": "dict(n_gpu_layers=0)",
    "gpu": "dict(n_gpu_layers=99)",
    "gpu, use_mmap=False": "dict(n_gpu_layers=99, use_mmap=False)",
    "gpu, tensor_split=[1.0]": "dict(n_gpu_layers=99, tensor_split=[1.0])",
    "gpu, split_mode=NONE": "dict(n_gpu_layers=99, split_mode=0)",
    # pyllm_kv.load reads the model's metadata with gguf-py first (read_model_info);
    # the plain variants above never import gguf: is that the difference?
    "gpu after import gguf": "'import gguf'",
    "gpu after read_model_info": "'read_model_info'",
    "pyllm_kv.load kv4 gpu": None,
}

CHILD = r"""
import sys, faulthandler
faulthandler.enable()
from pyllm_kv import _libs
path, kwargs = sys.argv[1], eval(sys.argv[2])
if kwargs == "import gguf":
    import gguf  # noqa: F401
    kwargs = dict(n_gpu_layers=99)
elif kwargs == "read_model_info":
    from pyllm_kv.model_info import read_model_info
    read_model_info(path)
    kwargs = dict(n_gpu_layers=99)
# C++ extensions that gguf-py pulls in when installed (as in a torch environment)
print("modules:", sorted(m for m in ("sentencepiece", "mistral_common", "torch", "transformers") if m in sys.modules),
      file=sys.stderr)
if kwargs is None:
    import pyllm_kv
    m = pyllm_kv.load(path, cache_k="kv4", cache_v="kv4", n_gpu_layers=99, verbose=True)
    print("TEXT:", m.generate("The capital of France is", max_tokens=8))
else:
    llama_cpp = _libs.llama_cpp()
    llm = llama_cpp.Llama(path, n_ctx=512, verbose=True, **kwargs)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    print("TEXT:", out["choices"][0]["text"])
"""

def main() -> int:
    path = sys.argv[1]
    for name, kw in VARIANTS.items():
        p = subprocess.run([sys.executable, "-c", CHILD, path, repr(kw) if kw is None else kw],
                           capture_output=True, text=True, timeout=120)
        text = [l for l in p.stdout.splitlines() if l.startswith("TEXT:")]
        mods = [l for l in p.stderr.splitlines() if l.startswith("modules:")]
        print(f"== {name}: rc={p.returncode} {text[0] if text else ''} {mods[0] if mods else ''}")
        if p.returncode != 0:
            print("   " + "\n   ".join(p.stderr.splitlines()[-25:]))
    return 0

if __name__ == "__main__":
    sys.exit(main())
