/*
 * Device helpers for the pyllm-kv block formats (layouts: pkv/codec.h).
 * Every block starts with u16 d, u16 m (one 32-bit word), then its payload,
 * and every block size (36, 28, 20 bytes) is a multiple of 4, so blocks are
 * read as 32-bit words.
 *
 * Unpacking works on "quads": the codes of values 4q..4q+3 of a block
 * (q = 0..15) as the four bytes of one uint32, with shifts and masks only:
 *   kv4: word q%8 of qs, nibble q/8            -> (w >> 4*(q/8)) & 0x0F0F0F0F
 *   kv2: word q%4 of qs, 2-bit field q/4       -> (w >> 2*(q/4)) & 0x03030303
 *   kv3: kv2's low bits from ql, plus bit q/2 of each byte of qh word q%2.
 */
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <utility>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "pkv/codec.h"

namespace pkv {

/* Programmatic dependent launch, as ggml-cuda launches its own kernels on
 * Hopper (GGML_CUDA_PDL, on unless set to 0): a kernel launched with
 * pdl_launch may start while the previous kernel in the stream finishes; it
 * must call pdl_wait() before touching memory that kernel writes (wait = full
 * completion and visibility of the previous grids). pdl_trigger() lets the
 * next kernel be scheduled early; that kernel waits the same way. */
static __device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
static __device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* Per-device state. Function attributes (the dynamic shared-memory limit) and
 * device properties belong to one device, and under llama.cpp's -sm layer/row our
 * kernels run on every GPU of the host: whatever is cached is cached per device. */
constexpr int PKV_MAX_DEVICES = 16;   /* GGML_CUDA_MAX_DEVICES */

static inline int current_device() {
    int dev = 0;
    return cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < PKV_MAX_DEVICES ? dev : -1;
}

/* Raise a kernel's dynamic shared-memory limit to `bytes` on the current device,
 * once per device (`done` is the caller's per-kernel static array). */
template <typename Kernel>
static inline cudaError_t raise_smem_limit(Kernel kernel, const int bytes, bool (&done)[PKV_MAX_DEVICES]) {
    const int dev = current_device();
    if (dev >= 0 && done[dev]) return cudaSuccess;
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess && dev >= 0) done[dev] = true;
    return e;
}

static inline bool pdl_enabled() {
    static int v[PKV_MAX_DEVICES] = {};   /* 0 unknown, 1 on, 2 off */
    const int dev = current_device();
    if (dev < 0) return false;
    if (v[dev] == 0) {
        const char * e = getenv("GGML_CUDA_PDL");
        int major = 0;
        const bool hopper = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                            major >= 9;
        v[dev] = (hopper && (e == nullptr || atoi(e) != 0)) ? 1 : 2;
    }
    return v[dev] == 1;
}

/* launch kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when enabled */
template <typename... KArgs, typename... Args>
static cudaError_t pdl_launch(void (*kernel)(KArgs...), const dim3 grid, const dim3 block, const size_t smem,
                              cudaStream_t stream, Args &&... args) {
    if (pdl_enabled()) {
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = grid;
        cfg.blockDim = block;
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
    }
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
}

template <int B> struct fmt;
template <> struct fmt<4> { static constexpr int bytes = 36; static constexpr int words = 9; };
template <> struct fmt<3> { static constexpr int bytes = 28; static constexpr int words = 7; };
template <> struct fmt<2> { static constexpr int bytes = 20; static constexpr int words = 5; };

static_assert(sizeof(pkv_block_kv4) == 36 && sizeof(pkv_block_kv3) == 28 && sizeof(pkv_block_kv2) == 20,
              "block sizes out of sync with pkv/codec.h");

/* codes of values 4q..4q+3, one per byte; w points at the block's first word */
template <int B>
static __device__ __forceinline__ uint32_t quad(const uint32_t * w, const int q) {
    if constexpr (B == 4) {
        return (w[1 + (q & 7)] >> (4 * (q >> 3))) & 0x0F0F0F0Fu;
    } else if constexpr (B == 2) {
        return (w[1 + (q & 3)] >> (2 * (q >> 2))) & 0x03030303u;
    } else {
        const uint32_t lo = (w[1 + (q & 3)] >> (2 * (q >> 2))) & 0x03030303u;
        const uint32_t hi = ((w[5 + (q & 1)] >> (q >> 1)) & 0x01010101u) << 2;
        return lo | hi;
    }
}

/* byte i of c as a float, exactly: (2^23 + c_i) - 2^23 */
static __device__ __forceinline__ float byte_f(const uint32_t c, const int i) {
    const uint32_t sel = (uint32_t) i | 0x7650u;    /* byte i of c, then bytes 1..3 of 0x4B000000 */
    return __uint_as_float(__byte_perm(c, 0x4B000000u, sel)) - 8388608.0f;
}

static __device__ __forceinline__ float2 dm(const uint32_t * w) {
    const uint32_t x = w[0];
    return make_float2(__half2float(__ushort_as_half((unsigned short) (x & 0xFFFFu))),
                       __half2float(__ushort_as_half((unsigned short) (x >> 16))));
}

static __device__ __forceinline__ float sanitize(float v) {
    if (v != v) return 0.0f;
    if (v >  65504.0f) return  65504.0f;
    if (v < -65504.0f) return -65504.0f;
    return v;
}

/* Decode value quad q of a block to 4 floats (m + d*code). */
template <int B>
static __device__ __forceinline__ void decode_quad(const uint32_t * w, const int q, float (&y)[4]) {
    const float2 s = dm(w);
    const uint32_t c = quad<B>(w, q);
#pragma unroll
    for (int i = 0; i < 4; i++) y[i] = fmaf(s.x, byte_f(c, i), s.y);
}

} // namespace pkv
