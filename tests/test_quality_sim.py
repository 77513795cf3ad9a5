"""The quality simulation's pieces (bench/qsim) on tiny inputs: the codecs against the
shipped C codec and ggml bit for bit, the levers against float64 references, the
Hadamard rotation against upstream's definition, centring's softmax invariance, and
the SQuat port against native/src/squat.c."""

from __future__ import annotations

import ctypes
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from qsim import attention, codecs, squat  # noqa: E402
from qsim.levers import HeadContext, parse  # noqa: E402

from pyllm_kv import _libs, native  # noqa: E402


def _rows(n=40, d=128, seed=0, outlier=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if outlier:
        x[:, 3] += 12.0  # a K-bias-like channel offset
        x[::7, 50] *= 9.0
    return x


# --------------------------------------------------------------------------- shipped codecs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kv_c_matches_native_codec_bit_for_bit(bits):
    """kv_c is the min/max block code: natively, SQuat's encoder with U = I
    (no error feedback; its blocks keep the min/max rule)."""
    x = _rows()
    got = codecs.kv_c(x, bits)
    eye = np.eye(x.shape[1], dtype=np.float32)
    for r in range(x.shape[0]):
        packed = native.squat_quantize_row(bits, x[r], eye)
        ref = native.dequantize(bits, packed, x.shape[1])
        np.testing.assert_array_equal(got[r].astype(np.float32), ref)


def _ggml():
    lib = ctypes.CDLL(str(_libs.lib_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _ggml_q(type_id: int, x: np.ndarray) -> bytes:
    lib = _ggml()
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros(x.size * 2, np.uint8)
    n = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, 1, x.size, None)
    return out[:n].tobytes()


def test_q4_0_matches_ggml():
    x = _rows(n=6)
    for r in range(x.shape[0]):
        raw = np.frombuffer(_ggml_q(2, x[r]), np.uint8).reshape(-1, 18)  # GGML_TYPE_Q4_0 = 2
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        qs = raw[:, 2:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        ref = ((codes - 8) * d).ravel()
        np.testing.assert_array_equal(codecs.q4_0(x[r:r + 1])[0].astype(np.float32), ref)


def test_q8_0_matches_ggml():
    x = _rows(n=6)
    for r in range(x.shape[0]):
        raw = np.frombuffer(_ggml_q(8, x[r]), np.uint8).reshape(-1, 34)  # GGML_TYPE_Q8_0 = 8
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        ref = (raw[:, 2:].view(np.int8).astype(np.float32) * d).ravel()
        np.testing.assert_array_equal(codecs.q8_0(x[r:r + 1])[0].astype(np.float32), ref)


# --------------------------------------------------------------------------- levers


def _lsq_block_error_reference(b, bits):
    """Brute force float64: best squared error of any (d, m) among a fine grid (upper bound)."""
    L = (1 << bits) - 1
    best = np.inf
    lo, hi = b.min(), b.max()
    for a in np.linspace(0, 0.3, 31):
        for c in np.linspace(0, 0.3, 31):
            m, top = lo + a * (hi - lo), hi - c * (hi - lo)
            d = (top - m) / L
            q = np.clip(np.rint((b - m) / d), 0, L)
            best = min(best, float(((m + d * q - b) ** 2).sum()))
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kv_opt_never_worse_than_minmax_and_near_brute_force(bits):
    x = _rows(n=24, d=64, seed=bits)
    e_c = ((codecs.kv_c(x, bits) - x) ** 2).sum(1)
    e_o = ((codecs.kv_opt(x, bits) - x) ** 2).sum(1)
    assert np.all(e_o <= e_c * (1 + 1e-3) + 1e-9)  # fp16 storage may cost a hair
    assert e_o.sum() < 0.95 * e_c.sum()
    for r in range(4):
        # within 5% of a brute-force clip search (fp16 rounding aside)
        assert e_o[r] <= 1.05 * _lsq_block_error_reference(x[r].astype(np.float64), bits) + 1e-6


def test_kv_opt_keeps_the_kv_layout():
    """Decoded values are m + d*code with 0 <= code < 2^b and fp16 d, m: what kv* decode reads."""
    x = _rows(n=8, d=64)
    y = codecs.kv_opt(x, 3)
    for r in range(8):
        vals = np.unique(y[r])
        assert len(vals) <= 8
        steps = np.diff(vals)
        d = steps.min()
        np.testing.assert_allclose(steps / d, np.rint(steps / d), atol=1e-6)
        assert np.float16(d) == d or abs(np.float16(d) - d) < 1e-6 * abs(d)


def test_sym_minmax_is_q4_0_and_sym_opt_improves_it():
    x = _rows(n=16, d=64)
    np.testing.assert_array_equal(codecs.sym_minmax(x, 4, 32), codecs.q4_0(x))
    e0 = ((codecs.q4_0(x) - x) ** 2).sum()
    e1 = ((codecs.sym_opt(x, 4, 32) - x) ** 2).sum()
    assert e1 < e0


def test_nonuniform_uses_only_codebook_levels():
    x = _rows(n=8, d=64, outlier=False)
    lv = codecs.lloyd_max(x.ravel() / np.abs(x).max(), 16)
    assert lv.shape == (16,) and np.all(np.diff(lv) > 0)
    np.testing.assert_allclose(lv, -lv[::-1], atol=1e-12)  # symmetric
    y = codecs.nonuniform(x, lv, 32)
    b = y.reshape(-1, 32)
    n = lv / np.abs(lv).max()
    for blk in b:
        s = np.abs(blk).max()
        assert np.all(np.min(np.abs(blk[:, None] / s - n[None, :]), axis=1) < 1e-6)


def test_lloyd_max_gaussian_levels():
    """Lloyd-Max for N(0,1) with 4 levels: +-0.4528, +-1.5104 (Max 1960)."""
    s = np.random.default_rng(1).standard_normal(400_000)
    lv = codecs.lloyd_max(s, 4, iters=200)
    np.testing.assert_allclose(np.abs(lv), [1.5104, 0.4528, 0.4528, 1.5104], atol=0.01)


def test_centering_removes_a_channel_offset():
    x = _rows(n=64, d=64)
    mu = x.astype(np.float64).mean(0)
    plain = parse("kv4").encode(x, HeadContext())
    cent = parse("c:kv4").encode(x, HeadContext(mu=mu))
    assert ((cent - x) ** 2).sum() < 0.5 * ((plain - x) ** 2).sum()


def test_bits_per_value_accounting():
    assert parse("kv4").bits(64, 2048) == 4.5
    assert parse("q4_0").bits(64, 2048) == 4.5
    assert parse("s4b64o").bits(64, 2048) == 4.25
    assert parse("c:kv3o").bits(64, 2048) == pytest.approx(3.5 + 16 / 2048)
    assert parse("sq:kv4").bits(64, 2048) == pytest.approx(4.5 + 8 * 65 / 2048)  # U: 64*65/2 fp16
    assert parse("sq:c:kv4o").as_value().name == "c:kv4o"


# --------------------------------------------------------------------------- rotation and metrics


def test_hadamard_is_upstreams():
    for n in (64, 256):
        h = attention.hadamard(n)
        np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)  # res^2 == I
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))
        # ggml_gen_hadamard's recursion: [[H, H], [H, -H]] of the half size
        half = attention.hadamard(n // 2) / np.sqrt(2)
        np.testing.assert_allclose(h[: n // 2, n // 2:], half)
        np.testing.assert_allclose(h[n // 2:, n // 2:], -half)
    assert attention.k_rot_size(64) == 64 and attention.k_rot_size(256) == 256
    assert attention.k_rot_size(192) == 64 and attention.v_rot_size(256) == 64


def test_softmax_invariance_of_key_centering():
    """Scores with k - mu differ from those with k by a per-query constant (q.mu)."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((5, 64)), rng.standard_normal((30, 64)) + 4.0
    mu = k.mean(0)
    s1, s2 = q @ k.T, q @ (k - mu).T
    diff = s1 - s2
    np.testing.assert_allclose(diff, np.repeat((q @ mu)[:, None], 30, axis=1), atol=1e-10)
    mask = np.ones((5, 30), bool)
    np.testing.assert_allclose(attention._softmax(s1, mask), attention._softmax(s2, mask), atol=1e-12)


def test_layer_reference_metrics():
    rng = np.random.default_rng(4)
    T, H, Hkv, D = 24, 4, 2, 64
    q = rng.standard_normal((T, H, D))
    k = rng.standard_normal((T, Hkv, D))
    v = rng.standard_normal((T, Hkv, D))
    ref = attention.LayerReference(q, k, v, [10, 20, 23], 0.125, n_swa=8)
    m = ref.metrics(k, v)
    assert m == {"kl": 0.0, "out": 0.0, "out_k": 0.0, "out_v": 0.0}
    # the sliding window hides old keys: changing key 0 moves query 5, not queries 20, 23
    k2 = k.copy()
    k2[0] += 5
    ref_early = attention.LayerReference(q, k, v, [5], 0.125, n_swa=8)
    assert ref_early.metrics(k2, v)["kl"] > 0
    ref_late = attention.LayerReference(q, k, v, [20, 23], 0.125, n_swa=8)
    assert ref_late.metrics(k2, v)["kl"] == 0.0
    # GQA: explicit float64 attention for query head 3 (KV head 1)
    s = q[23, 3] @ k[:, 1].T * 0.125
    s[np.arange(T) <= 23 - 8] = -np.inf
    p = np.exp(s - s.max())
    p /= p.sum()
    np.testing.assert_allclose(ref.o[3][2], p @ v[:, 1], rtol=1e-12)


# --------------------------------------------------------------------------- SQuat


def test_squat_prepare_matches_native():
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((200, 64)) * np.linspace(3, 0.1, 64)).astype(np.float32)
    U = squat.prepare(q, 20, 100.0, True)
    Un = native.squat_prepare(q, 64, 20, 100.0, True)
    np.testing.assert_allclose(U, Un, atol=2e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_squat_encoder_matches_native(bits):
    rng = np.random.default_rng(6)
    q = (rng.standard_normal((200, 64)) * np.linspace(3, 0.1, 64)).astype(np.float32)
    U = squat.packed_fp16(native.squat_prepare(q, 64, 20, 100.0, True))
    k = _rows(n=30, d=64, seed=bits)
    got = squat.encode_kv(k, U, bits)
    same = 0
    for r in range(k.shape[0]):
        ref = native.dequantize(bits, native.squat_quantize_row(bits, k[r], U, reference=True), 64)
        same += int(np.sum(got[r].astype(np.float32) == ref))
    assert same >= 0.995 * k.size  # the C error feedback uses fma; a rare code may flip


def test_squat_affine_with_identity_is_plain():
    k = _rows(n=10, d=64)
    U = np.eye(64, dtype=np.float32)
    got = squat.encode_affine(k, U, lambda w: codecs.kv_opt_params(w, 3), 8, 64)
    np.testing.assert_allclose(got, codecs.kv_opt(k, 3), atol=1e-6)


def test_calibration_fit_recovers_a_power_law():
    import quality_levers_report as rep

    sims = {"q8_0": 1e-4, "q4_0": 1e-2, "kv4": 1.2e-2, "kv3": 6e-2, "sq:kv4/kv4": 8e-3}
    ev = {"results": [{"format": "f16", "is_reference": True, "n_tokens": 10}] + [
        {"format": "squat4" if k.startswith("sq:") else k, "kld_mean": 3.0 * v ** 0.8, "n_tokens": 10,
         "bits_per_value": 4.5, "ppl_delta_pct": 1.0, "top1": 0.9} for k, v in sims.items()]}
    sj = {"results": [{"pair": k, "out": v} for k, v in sims.items()]}
    cal = rep.calibrate(ev, sj)
    assert cal["slope"] == pytest.approx(0.8) and math.exp(cal["intercept"]) == pytest.approx(3.0)
    assert cal["spearman"] == pytest.approx(1.0) and len(cal["points"]) == 5
    assert rep.predict_fit(cal, 1e-2) == pytest.approx(3.0 * 1e-2 ** 0.8)
    # the interpolation goes through the real points and is monotone between them
    assert rep.predict(cal, 1e-2) == pytest.approx(3.0 * 1e-2 ** 0.8)
    assert rep.predict(cal, 1e-3) < rep.predict(cal, 1e-2) < rep.predict(cal, 2e-2)


def test_smoothing_with_unit_scales_is_the_inner_encoder_and_keeps_scores():
    rng = np.random.default_rng(8)
    k = attention.rotate(rng.standard_normal((20, 64)) * np.r_[30.0, np.ones(63)], 64)
    mu = k[:10].mean(0)
    one = HeadContext(mu=mu, smooth=np.ones(64), rot=64)
    a = parse("sm:c:kv4o").encode(k, one)
    b = parse("c:kv4o").encode(k, HeadContext(mu=mu))
    # undoing and redoing the rotation moves values by ~1e-15, which may flip a tie in the
    # scale search of a row: nearly every row is identical, and the error is the same
    same_rows = np.all(np.abs(a - b) < 1e-9, axis=1)
    assert same_rows.mean() >= 0.9
    assert ((a - k) ** 2).sum() == pytest.approx(((b - k) ** 2).sum(), rel=0.02)
    # with a real scale the decoded keys stay in the same domain and the outlier channel's
    # spread no longer sets every block's step: smaller error than without smoothing
    s = np.r_[np.sqrt(30.0), np.ones(63)] / np.exp(np.log(np.r_[np.sqrt(30.0), np.ones(63)]).mean())
    sm = parse("sm:c:kv4o").encode(k, HeadContext(mu=mu, smooth=s, rot=64))
    plain = parse("c:kv4o").encode(k, HeadContext(mu=mu))
    q = rng.standard_normal((5, 64))
    e_sm = np.abs(q @ (sm - k).T).mean()
    e_pl = np.abs(q @ (plain - k).T).mean()
    assert e_sm < e_pl
    assert parse("sm:c:kv4o").bits(64, 2048) == pytest.approx(4.5 + 32 / 2048)
    assert parse("sm:sq:c:kv4o").as_value().name == "c:kv4o"


def test_fit_time_choices_return_one_of_the_two_encodings():
    rng = np.random.default_rng(9)
    k = attention.rotate(rng.standard_normal((64, 64)) * np.r_[20.0, np.ones(63)], 64)
    q = rng.standard_normal((16, 64))
    s = np.r_[np.sqrt(20.0), np.ones(63)]
    s = s / np.exp(np.log(s).mean())
    ctx = HeadContext(mu=k[:32].mean(0), smooth=s, rot=64, fit_q=q, fit_rows=32,
                      fit_q_pos=np.repeat(np.arange(0, 32, 2), 1), kq_scale=0.125)
    with_s = parse("sm:c:kv4o").encode(k, ctx)
    without = parse("c:kv4o").encode(k, ctx)
    for name in ("sa:c:kv4o", "sw:c:kv4o"):
        got = parse(name).encode(k, ctx)
        assert np.array_equal(got, with_s) or np.array_equal(got, without)


def test_per_ubatch_squat_with_identity_factors_is_plain():
    k = _rows(n=20, d=64)
    eye = squat.packed_fp16(np.eye(64, dtype=np.float32))
    ctx = HeadContext(U_list=[(0, 10, eye), (10, 20, eye)])
    np.testing.assert_array_equal(parse("sqb:kv4").encode(k, ctx), codecs.kv_c(k, 4))
