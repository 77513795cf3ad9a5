"""cffi access to native/'s C ABI (libpyllm_kv_native): the block codec.

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
