"""cffi access to native/'s C ABI (libpyllm_kv_native): the block codec and
the side-state math of DecoQuant / SQuat (native/include/pkv/sidestate.h).

Tests and analysis tools call the very functions ggml's type traits point at,
so what is checked here is what runs inside llama.cpp.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from cffi import FFI

from . import _libs

_CDEF = """
size_t pkv_block_bytes(int bits);
double pkv_bits_per_value(int bits);
void pkv_quantize_row(int bits, const float * x, void * y, int64_t k);
void pkv_dequantize_row(int bits, const void * x, float * y, int64_t k);
void pkv_vec_dot_kv4_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void pkv_vec_dot_kv3_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void pkv_vec_dot_kv2_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void pkv_dequantize_row_kv4(const void * x, float * y, int64_t k);
void pkv_dequantize_row_kv3(const void * x, float * y, int64_t k);
void pkv_dequantize_row_kv2(const void * x, float * y, int64_t k);
void pkv_vec_mad_kv4(float * y, const void * x, float v, int n);
void pkv_vec_mad_kv3(float * y, const void * x, float v, int n);
void pkv_vec_mad_kv2(float * y, const void * x, float v, int n);
void pkv_vec_mad_row(int bits, float * y, const void * x, float v, int n);
void pkv_quantize_row_q8_1_ref(const float * x, void * y, int64_t k);
bool pkv_validate_row(int bits, const void * data, size_t nbytes);
uint16_t pkv_fp32_to_fp16(float f);
float pkv_fp16_to_fp32(uint16_t h);
int pkv_sym_eig(int n, const double * A, double * evals, double * evecs);
int pkv_cholesky_upper(int n, const double * A, double * U);
int pkv_deco_fit(const float * x, int64_t n_rows, int64_t row_stride, int64_t row_len,
                 int g, int variant, float * S, float * Sinv);
int pkv_squat_prepare(const float * q, int64_t n_q, int d, int r, float lambda,
                      int normalize, float * U);
void pkv_squat_quantize_row(int bits, const float * k, const float * U, int d, void * out);
void pkv_squat_quantize_row_ref(int bits, const float * k, const float * U, int d, void * out);
size_t pkv_squat_packed_len(int d);
void pkv_squat_pack(const float * U, int d, uint16_t * Up);
void pkv_squat_unpack(const uint16_t * Up, int d, float * U);
void pkv_squat_quantize_rows(int bits, const float * k, int64_t n_rows, int n_heads,
                             const float * U_per_head, int d, void * out);
int pkv_squat_set_rows_head_dim(int64_t n_embd, int64_t n_head, int64_t u_len);
size_t pkv_squat_set_rows_work(int d, int n_head);
int pkv_squat_set_rows(int bits, int d, int n_head, const void * k, size_t k_stride, int64_t n_rows,
                       const void * idx, int idx_i64, size_t idx_stride, const void * U, size_t u_stride,
                       void * out, size_t out_stride, int64_t n_cells, int ith, int nth, float * work);
"""

BLOCK = 64          # values per block (PKV_BLOCK)
Q8_1_BLOCK = 32     # values per q8_1 block
Q8_1_BYTES = 36


@functools.lru_cache(maxsize=1)
def lib():
    ffi = FFI()
    ffi.cdef(_CDEF)
    path = os.path.join(_libs.lib_dir(), "libpyllm_kv_native.so")
    return ffi, ffi.dlopen(path)


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def block_bytes(bits: int) -> int:
    return int(lib()[1].pkv_block_bytes(bits))


def bits_per_value(bits: int) -> float:
    return float(lib()[1].pkv_bits_per_value(bits))


def quantize(bits: int, x) -> np.ndarray:
    """Encode a 1-D row (length a multiple of 64) into packed blocks (uint8)."""
    ffi, L = lib()
    x = _f32(x)
    if x.ndim != 1 or x.size % BLOCK:
        raise ValueError(f"row length must be a multiple of {BLOCK}, got shape {x.shape}")
    out = np.zeros(x.size // BLOCK * block_bytes(bits), dtype=np.uint8)
    L.pkv_quantize_row(bits, ffi.from_buffer("float[]", x), ffi.from_buffer(out), x.size)
    return out


def dequantize(bits: int, packed, n: int) -> np.ndarray:
    ffi, L = lib()
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    L.pkv_dequantize_row(bits, ffi.from_buffer(packed), ffi.from_buffer("float[]", out), n)
    return out


def dequantize_fast(bits: int, packed, n: int) -> np.ndarray:
    """The decode ggml calls (SIMD when compiled in); must equal dequantize()."""
    ffi, L = lib()
    fn = {4: L.pkv_dequantize_row_kv4, 3: L.pkv_dequantize_row_kv3, 2: L.pkv_dequantize_row_kv2}[bits]
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    fn(ffi.from_buffer(packed), ffi.from_buffer("float[]", out), n)
    return out


def vec_mad(bits: int, acc, packed, v: float, reference: bool = False) -> np.ndarray:
    """acc + v * decode(packed), via the kernel ggml's flash attention calls
    (or the scalar reference with reference=True). Returns a new array."""
    ffi, L = lib()
    out = np.array(acc, dtype=np.float32, copy=True)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    y, x = ffi.from_buffer("float[]", out), ffi.from_buffer(packed)
    if reference:
        L.pkv_vec_mad_row(bits, y, x, v, out.size)
    else:
        {4: L.pkv_vec_mad_kv4, 3: L.pkv_vec_mad_kv3, 2: L.pkv_vec_mad_kv2}[bits](y, x, v, out.size)
    return out


def quantize_q8_1(x) -> np.ndarray:
    ffi, L = lib()
    x = _f32(x)
    out = np.zeros(x.size // Q8_1_BLOCK * Q8_1_BYTES, dtype=np.uint8)
    L.pkv_quantize_row_q8_1_ref(ffi.from_buffer("float[]", x), ffi.from_buffer(out), x.size)
    return out


def vec_dot_q8_1(bits: int, packed, q8, n: int) -> float:
    ffi, L = lib()
    fn = {4: L.pkv_vec_dot_kv4_q8_1, 3: L.pkv_vec_dot_kv3_q8_1, 2: L.pkv_vec_dot_kv2_q8_1}[bits]
    s = ffi.new("float *")
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    q8 = np.ascontiguousarray(q8, dtype=np.uint8)
    fn(n, s, 0, ffi.from_buffer(packed), 0, ffi.from_buffer(q8), 0, 1)
    return float(s[0])


def validate(bits: int, packed) -> bool:
    ffi, L = lib()
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    return bool(L.pkv_validate_row(bits, ffi.from_buffer(packed), packed.size))


def fp16_round(x) -> np.ndarray:
    """Round float32 values through native's fp16 conversion (vectorised in numpy
    for speed; tests check both agree)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# --- side-state math (native/include/pkv/sidestate.h) -----------------------

DECO_WHITEN = 0     # S = diag(sigma) V^T / sqrt(n_groups)
DECO_ROTATE = 1     # S = V^T


class NativeCallError(RuntimeError):
    """A native side-state function returned a nonzero status."""

    def __init__(self, func: str, rc: int):
        super().__init__(f"{func} returned {rc}")
        self.rc = rc


def _f64(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64)


def sym_eig(A):
    """Eigen-decomposition of a symmetric matrix by native cyclic Jacobi.

    Returns (evals descending, evecs) with column j of evecs the eigenvector
    of evals[j], like numpy.linalg.eigh but in descending order."""
    ffi, L = lib()
    A = _f64(A)
    n = A.shape[0]
    if A.shape != (n, n):
        raise ValueError(f"need a square matrix, got shape {A.shape}")
    evals = np.empty(n, dtype=np.float64)
    evecs = np.empty((n, n), dtype=np.float64)
    rc = L.pkv_sym_eig(n, ffi.from_buffer("double[]", A), ffi.from_buffer("double[]", evals),
                       ffi.from_buffer("double[]", evecs))
    if rc:
        raise NativeCallError("pkv_sym_eig", rc)
    return evals, evecs


def cholesky_upper(A) -> np.ndarray:
    """U upper triangular with A = U^T U."""
    ffi, L = lib()
    A = _f64(A)
    n = A.shape[0]
    U = np.empty((n, n), dtype=np.float64)
    rc = L.pkv_cholesky_upper(n, ffi.from_buffer("double[]", A), ffi.from_buffer("double[]", U))
    if rc:
        raise NativeCallError("pkv_cholesky_upper", rc)
    return U


def deco_fit_raw(x, n_rows: int, row_stride: int, row_len: int, g: int, variant: int,
                 offset: int = 0):
    """pkv_deco_fit on a flat float32 buffer, arguments passed through as given
    (tests of the argument checks). Returns (rc, S, Sinv)."""
    ffi, L = lib()
    buf = _f32(np.asarray(x).reshape(-1))
    gg = max(int(g), 1)
    S = np.full((gg, gg), np.nan, dtype=np.float32)
    Sinv = np.full((gg, gg), np.nan, dtype=np.float32)
    ptr = ffi.from_buffer("float[]", buf) + offset if buf.size else ffi.NULL
    rc = L.pkv_deco_fit(ptr, n_rows, row_stride, row_len, g, variant,
                        ffi.from_buffer("float[]", S), ffi.from_buffer("float[]", Sinv))
    return int(rc), S, Sinv


def deco_fit(x, g: int, variant: int = DECO_WHITEN, col0: int = 0, row_len: "int | None" = None):
    """DecoQuant transform of the rows of 2-D x (columns col0 .. col0+row_len,
    i.e. a per-head slice with row stride x.shape[1]). Returns (S, Sinv), g x g
    float32 with the row-vector convention u = x_g @ Sinv, x_g = u @ S."""
    x = _f32(x)
    if x.ndim != 2:
        raise ValueError(f"need a 2-D array of rows, got shape {x.shape}")
    n_rows, stride = x.shape
    row_len = stride - col0 if row_len is None else row_len
    if col0 < 0 or col0 + row_len > stride:
        raise ValueError("slice outside the rows")
    rc, S, Sinv = deco_fit_raw(x, n_rows, stride, row_len, g, variant, offset=col0)
    if rc:
        raise NativeCallError("pkv_deco_fit", rc)
    return S, Sinv


def squat_prepare(q, d: int, r: int, lam: float, normalize: bool = True) -> np.ndarray:
    """SQuat factor U (d x d, upper triangular, A^-1 = U^T U) from query rows q
    (n_q x d)."""
    ffi, L = lib()
    q = _f32(np.asarray(q).reshape(-1, d))
    U = np.empty((d, d), dtype=np.float32)
    qp = ffi.from_buffer("float[]", q) if q.size else ffi.NULL
    rc = L.pkv_squat_prepare(qp, q.shape[0], d, r, lam, int(bool(normalize)),
                             ffi.from_buffer("float[]", U))
    if rc:
        raise NativeCallError("pkv_squat_prepare", rc)
    return U


def squat_quantize_row(bits: int, k, U, reference: bool = False) -> np.ndarray:
    """Encode one key head vector with the SQuat encoder into plain blocks
    (``reference``: the scalar error feedback instead of AVX2)."""
    ffi, L = lib()
    k = _f32(k)
    d = k.size
    if k.ndim != 1 or d % BLOCK:
        raise ValueError(f"key length must be a multiple of {BLOCK}, got shape {k.shape}")
    U = _f32(U)
    if U.shape != (d, d):
        raise ValueError(f"U must be {d}x{d}, got {U.shape}")
    out = np.zeros(d // BLOCK * block_bytes(bits), dtype=np.uint8)
    fn = L.pkv_squat_quantize_row_ref if reference else L.pkv_squat_quantize_row
    fn(bits, ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", U), d, ffi.from_buffer(out))
    return out


def squat_pack(U) -> np.ndarray:
    """U (d x d) -> its upper triangle, row by row, as fp16 bits (uint16)."""
    ffi, L = lib()
    U = _f32(U)
    d = U.shape[0]
    if U.ndim != 2 or U.shape != (d, d) or d < 1:
        raise ValueError(f"U must be square, got {U.shape}")
    out = np.zeros(L.pkv_squat_packed_len(d), dtype=np.uint16)
    L.pkv_squat_pack(ffi.from_buffer("float[]", U), d, ffi.cast("uint16_t *", ffi.from_buffer(out)))
    return out


def squat_unpack(Up, d: int) -> np.ndarray:
    """Inverse of :func:`squat_pack` (zeros below the diagonal)."""
    ffi, L = lib()
    Up = np.ascontiguousarray(Up, dtype=np.uint16)
    if Up.size != L.pkv_squat_packed_len(d):
        raise ValueError(f"packed U of d={d} has {L.pkv_squat_packed_len(d)} values, got {Up.size}")
    U = np.zeros((d, d), dtype=np.float32)
    L.pkv_squat_unpack(ffi.cast("uint16_t *", ffi.from_buffer(Up)), d, ffi.from_buffer("float[]", U))
    return U


def squat_quantize_rows(bits: int, k, U_per_head) -> np.ndarray:
    """k: (n_rows, n_heads, d); U_per_head: (n_heads, d, d). Returns the packed
    rows, shape (n_rows, n_heads*d/64*block_bytes)."""
    ffi, L = lib()
    k = _f32(k)
    n_rows, n_heads, d = k.shape
    U = _f32(U_per_head)
    if U.shape != (n_heads, d, d) or d % BLOCK:
        raise ValueError(f"bad shapes: k {k.shape}, U {U.shape}")
    out = np.zeros((n_rows, n_heads * d // BLOCK * block_bytes(bits)), dtype=np.uint8)
    L.pkv_squat_quantize_rows(bits, ffi.from_buffer("float[]", k), n_rows, n_heads,
                              ffi.from_buffer("float[]", U), d, ffi.from_buffer(out))
    return out
