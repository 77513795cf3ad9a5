# Sourced by the GPU-machine scripts (gpu_run.sh, long_context.sh): where the CUDA
# build and the pinned llama-cpp-python live there, and the environment that makes
# pyllm_kv use them. REPO: the working tree (the caller's directory).
SRC=/tmp/src/llama_cpp_python-0.3.36
B=/tmp/b
export PIP_BREAK_SYSTEM_PACKAGES=1 PYLLM_KV_LIB_DIR=$B/bin PYLLM_KV_BIN_DIR=$B/bin PYTHONPATH=$SRC:${REPO:-$PWD}
# a prebuilt build (.carry9) finds libcudart/libcublas 13 in the machine's toolkit
# (its RUNPATH names the dev machine's directories)
export LD_LIBRARY_PATH=$B/bin:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
