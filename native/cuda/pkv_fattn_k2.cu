/* Instances of the flash-attention decode kernels with K type 2 (see pkv_fattn.cuh, pkv_fattn_mma.cuh,
 * pkv_fattn_v3.cuh); one file per K type so the build compiles them in parallel. */
#include "pkv_fattn_v3.cuh"

namespace pkv {
int fattn_launch_k2(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    return fattn_launch_v<2>(kp, v_type, D, R, n_rowgroups, n_seq, stream);
}
int fattn_mma_launch_k2(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    return fattn_mma_launch_v<2>(kp, v_type, D, R, n_rowgroups, n_seq, stream);
}
int fattn3_launch_k2(const fa_kparams & kp, int v_type, int ns, int n_rowgroups, int n_seq, cudaStream_t stream) {
    return fa3::launch_v<2>(kp, v_type, ns, n_rowgroups, n_seq, stream);
}
int fattn3_occupancy_k2(int v_type, int ns) {
    return fa3::occupancy_v<2>(v_type, ns);
}
} // namespace pkv
