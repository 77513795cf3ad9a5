#!/usr/bin/env bash
# Pack a CUDA build made on this (GPU-less) machine for gpu_run.sh, so that the
# device's minutes go to measuring, not to compiling (../shared/DEVICE.md).
#
#   bash bench/device/configure_cuda_build.sh /work/build-cuda   (cmake with the cuBLAS
#                                          wheel, a libcuda stub and ccache)
#   ninja -C /work/build-cuda llama pyllm_kv_native llama-bench llama-perplexity llama-completion \
#     test-backend-ops pkv-cuda-test ggml-rpc-server
#   bash bench/device/pack_prebuilt.sh /work/build-cuda     -> .carry9/ (git-ignored)
#
# First build here: ~30 min on 2 cores (ccache keeps later ones short); the pack is
# ~50 MB (libggml-cuda 70 MB before gzip), under the 64 MiB a call carries with the tree.
# .carry9 holds the libraries and tools (bin/), llama-cpp-python's Python layer, the
# test wheels and BUILD_INFO (the commit and a hash of the sources the build used;
# gpu_run.sh says so when the tree it runs in has other sources). The device needs
# its own libcudart/libcublas 13 and driver, which it has.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:?build directory}
[ -f .carry1/llama_cpp_python-0.3.36-trim.tgz ] || { echo "run bench/device/prepare_carries.sh first" >&2; exit 1; }
rm -rf .carry9 && mkdir -p .carry9
cp "$B"/native/libpyllm_kv_native.so "$B"/bin/
# ggml-cpu's OpenMP runtime: the device's loader does not find the system one
# (llama-bench and test-backend-ops exited 127 there without it; pkv-cuda-test,
# which does not load ggml-cpu, ran)
gomp=$(ldd "$B"/bin/libggml-cpu.so | awk '/libgomp/ {print $3}')
if [ -n "$gomp" ] && ! [ "$gomp" -ef "$B/bin/$(basename "$gomp")" ]; then cp -L "$gomp" "$B"/bin/; fi
( cd "$B" && tar czf - bin/*.so* bin/llama-bench bin/llama-perplexity bin/llama-completion bin/test-backend-ops \
      bin/pkv-cuda-test bin/ggml-rpc-server ) > .carry9/cuda-prebuilt.tar.gz
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf .carry1/llama_cpp_python-0.3.36-trim.tgz -C "$tmp" llama_cpp_python-0.3.36/llama_cpp
tar czf .carry9/llama_cpp_py.tgz -C "$tmp" llama_cpp_python-0.3.36/llama_cpp
cp -r .carry1/wheels .carry9/
echo "$(git rev-parse HEAD) $(bash bench/device/sources_hash.sh)" > .carry9/BUILD_INFO
du -sh .carry9 .carry9/*
