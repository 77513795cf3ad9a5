/* Instances of the flash-attention decode kernel with K type 16 (see pkv_fattn.cuh, pkv_fattn_mma.cuh);
 * one file per K type so the build compiles them in parallel. */
#include "pkv_fattn_mma.cuh"

namespace pkv {
int fattn_launch_k16(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    return fattn_launch_v<PKV_CUDA_KV_F16>(kp, v_type, D, R, n_rowgroups, n_seq, stream);
}
int fattn_mma_launch_k16(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    return fattn_mma_launch_v<PKV_CUDA_KV_F16>(kp, v_type, D, R, n_rowgroups, n_seq, stream);
}
} // namespace pkv
