#!/usr/bin/env bash
# Configure a CUDA build of the patched tree on this GPU-less dev machine, for
# bench/device/pack_prebuilt.sh (then the device spends no minute compiling):
#
#   bash bench/device/configure_cuda_build.sh [BUILD_DIR]        (default /work/build-cuda)
#   ninja -C BUILD_DIR llama pyllm_kv_native llama-bench llama-perplexity llama-completion \
#       test-backend-ops pkv-cuda-test ggml-rpc-server
#   bash bench/device/pack_prebuilt.sh BUILD_DIR                 -> .carry9/
#
# What a machine with nvcc but no driver and no cuBLAS needs, set up under
# $PYLLM_KV_CUDA_DEPS (default ~/.cache/pyllm-kv/cuda-deps):
#   - cuBLAS 13 headers and libraries from PyPI's nvidia-cublas wheel (unpacked,
#     with the unversioned .so links the linker wants);
#   - a stub libcuda.so with SONAME libcuda.so.1: the tools link against the
#     driver API only through libggml-cuda, so executables link with
#     --allow-shlib-undefined and the device's real driver resolves it at run time.
# ccache is used when installed (apt-get install ccache): a first build is ~60 CPU-minutes
# (about 35-60 min on 2 cores), later ones recompile only what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-/work/build-cuda}
D=${PYLLM_KV_CUDA_DEPS:-$HOME/.cache/pyllm-kv/cuda-deps}
SDIST=${PYLLM_KV_SDIST:-$HOME/.cache/pyllm-kv/llama_cpp_python-0.3.36.tar.gz}
command -v nvcc > /dev/null || { echo "nvcc not on PATH" >&2; exit 1; }
[ -f "$SDIST" ] || pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$(dirname "$SDIST")"
C=$D/cublas/nvidia/cu13
if [ ! -f "$C/include/cublas_v2.h" ]; then
    mkdir -p "$D"
    pip download -q --no-deps "nvidia-cublas>=13,<14" -d "$D/wheel"
    python3 -m zipfile -e "$D"/wheel/nvidia_cublas-*.whl "$D/cublas"
    rm -rf "$D/wheel"
fi
ln -sf libcublas.so.13 "$C/lib/libcublas.so"
ln -sf libcublasLt.so.13 "$C/lib/libcublasLt.so"
ST=$D/stub
if [ ! -f "$ST/libcuda.so" ]; then
    mkdir -p "$ST"
    echo "" | gcc -shared -o "$ST/libcuda.so" -Wl,-soname,libcuda.so.1 -x c -
    ln -sf libcuda.so "$ST/libcuda.so.1"
fi
L=()
command -v ccache > /dev/null && L=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
                                    -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_UPSTREAM_TESTS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    "${L[@]}" \
    -DCUDA_cuda_driver_LIBRARY="$ST/libcuda.so" \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$ST -Wl,-rpath-link,$C/lib -Wl,--allow-shlib-undefined" \
    -DCMAKE_SHARED_LINKER_FLAGS="-Wl,-rpath-link,$ST -Wl,-rpath-link,$C/lib" \
    -DCUDA_cublas_LIBRARY="$C/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$C/lib/libcublasLt.so" \
    -DCMAKE_CUDA_FLAGS="-I$C/include" -DCMAKE_CXX_FLAGS="-I$C/include" \
    -DPYLLM_KV_LLAMA_SRC="$SDIST"
echo "configured $B; now: ninja -C $B llama pyllm_kv_native llama-bench llama-perplexity llama-completion test-backend-ops pkv-cuda-test ggml-rpc-server"
