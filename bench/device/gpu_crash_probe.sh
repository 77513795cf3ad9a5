# Why pyllm_kv.load dies on the GPU machine's build (issue 15): toolchain facts,
# the libraries' C++ runtime, and the main job under a few loader variants.
export PYLLM_KV_LIB_DIR=/tmp/b/bin PYLLM_KV_BIN_DIR=/tmp/b/bin PYTHONPATH=/tmp/src/llama_cpp_python-0.3.36:$PWD
which g++ c++ gcc; g++ --version | head -1; env | grep -E "FLAGS|^CC=|^CXX=|LD_" ; grep -E "CMAKE_CXX_COMPILER:|LINKER_FLAGS:|CMAKE_CXX_FLAGS:|CMAKE_CUDA_HOST" /tmp/b/CMakeCache.txt
for l in libggml.so libggml-base.so libllama.so libggml-cuda.so libpyllm_kv_native.so; do
  echo "$l NEEDED: $(readelf -d /tmp/b/bin/$l | grep NEEDED | grep -oE '\[.*\]' | tr '\n' ' ') std-exports=$(nm -D --defined-only /tmp/b/bin/$l | grep -c ' _ZNS\| _ZSt\| _ZNK\?St\| __cxa\| __dynamic')"
done
cat > /tmp/t2.py <<'PY'
import sys, faulthandler; faulthandler.enable()
mode = sys.argv[1]
import pyllm_kv
m = pyllm_kv.load('/tmp/smollm2.gguf', cache_k='f16', cache_v='f16', n_ctx=512, n_gpu_layers=int(mode), n_threads=4)
print("OK ngl", mode, m.generate('The capital of France is', max_tokens=6, temperature=0))
PY
for pre in "" /lib/x86_64-linux-gnu/libstdc++.so.6; do for mode in 0 99; do
  echo "== ngl $mode preload '$pre'"; LD_PRELOAD=$pre timeout 90 python3 /tmp/t2.py $mode > /tmp/t2.log 2>&1; echo "rc=$?"
  grep -E "^OK|Fatal|line" /tmp/t2.log | head -8; grep -v "^llama_model_loader\|^print_info\|^load\|^  File\|^ " /tmp/t2.log | tail -4
done; done
