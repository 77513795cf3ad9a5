#!/usr/bin/env bash
# One hash of everything a native build depends on (our C/CUDA sources, the
# patches, the CMake files): gpu_run.sh compares it with .carry9/BUILD_INFO.
# find, not git: the device's copy of the tree may not be a git checkout.
cd "$(dirname "$0")/../.."
find native patches cmake CMakeLists.txt -type f | LC_ALL=C sort | xargs cat | md5sum | cut -d' ' -f1
