"""pkv_squat_set_rows (native/src/squat_set_rows.c): SQuat keys stored by ggml-cpu's
set_rows with src[3] = U, which is how an rpc-server holding a K cache stores them
(patches/0010). Its bytes must be those of the client's own store: the SQuat
encoder per head on the unpacked fp16 U, every row at its index, nothing else
written, whatever the thread split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyllm_kv import native

D, N_HEAD, N_ROWS, N_CELLS = 64, 3, 7, 12


@pytest.fixture(scope="module")
def case(lib_dir: Path):
    rng = np.random.default_rng(7)
    packed = []
    for _ in range(N_HEAD):  # a real factor per head: fitted from random "queries"
        U = native.squat_prepare(rng.standard_normal((40, D)).astype(np.float32), D, r=8, lam=100.0)
        packed.append(native.squat_pack(U))
    Up = np.stack(packed)                                    # [n_head, d(d+1)/2] fp16 bits
    k = (rng.standard_normal((N_ROWS, N_HEAD * D)) * 3).astype(np.float32)
    idx = rng.permutation(N_CELLS)[:N_ROWS]
    return k, Up, idx


def _set_rows(bits, k, Up, idx, idx_dtype, nth=1, ith_list=None):
    ffi, L = native.lib()
    row_bytes = N_HEAD * D // native.BLOCK * native.block_bytes(bits)
    out = np.zeros((N_CELLS, row_bytes), dtype=np.uint8)
    idx = np.ascontiguousarray(idx, dtype=idx_dtype)
    d = L.pkv_squat_set_rows_head_dim(N_HEAD * D, N_HEAD, Up.shape[1])
    work = np.zeros(L.pkv_squat_set_rows_work(d, N_HEAD), dtype=np.float32)
    rcs = []
    for ith in (range(nth) if ith_list is None else ith_list):
        rcs.append(L.pkv_squat_set_rows(
            bits, d, N_HEAD, ffi.from_buffer(k), k.strides[0], k.shape[0],
            ffi.from_buffer(idx), int(idx.dtype == np.int64), idx.strides[0],
            ffi.from_buffer(Up), Up.strides[0], ffi.from_buffer(out), out.strides[0], N_CELLS,
            ith, nth, ffi.cast("float *", ffi.from_buffer(work))))
    return rcs, out


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("nth", [1, 3])
def test_same_bytes_as_the_squat_encoder(case, bits, idx_dtype, nth):
    k, Up, idx = case
    rcs, out = _set_rows(bits, k, Up, idx, idx_dtype, nth=nth)
    assert rcs == [0] * nth
    Us = [native.squat_unpack(Up[h], D) for h in range(N_HEAD)]
    for t, row in enumerate(idx):
        want = np.concatenate([native.squat_quantize_row(bits, k[t, h * D:(h + 1) * D], Us[h])
                               for h in range(N_HEAD)])
        assert np.array_equal(out[row], want), (t, row)
    untouched = np.setdiff1d(np.arange(N_CELLS), idx)
    assert not out[untouched].any()
    # and not the plain encoder: U matters
    plain = native.quantize(bits, k[0])
    assert not np.array_equal(out[idx[0]], plain)


def test_bad_index_writes_nothing(case):
    k, Up, idx = case
    bad = idx.copy()
    bad[-1] = N_CELLS  # one past the cache
    rcs, out = _set_rows(4, k, Up, bad, np.int64)
    assert rcs == [-1] and not out.any()


def test_head_dim_of_shapes(lib_dir: Path):
    _, L = native.lib()
    assert L.pkv_squat_set_rows_head_dim(192, 3, 64 * 65 // 2) == 64
    assert L.pkv_squat_set_rows_head_dim(256, 1, 256 * 257 // 2) == 256
    assert L.pkv_squat_set_rows_head_dim(192, 3, 64 * 65 // 2 - 1) == 0   # U of another size
    assert L.pkv_squat_set_rows_head_dim(96, 1, 96 * 97 // 2) == 0        # not a multiple of 64
    assert L.pkv_squat_set_rows_head_dim(192, 5, 10) == 0                 # heads do not divide the row
