"""Numerics of `pyllm-kv eval` on hand-made distributions (no model, no native library)."""

import math

import numpy as np
import pytest

from pyllm_kv.eval_metrics import Accumulator, Reference, compare, kl_divergence, log_softmax


def test_log_softmax_normalised_and_shift_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 1000)).astype(np.float32) * 8
    lp = log_softmax(x)
    assert lp.dtype == np.float64
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(log_softmax(x.astype(np.float64) + 1000.0), lp, atol=1e-9)


def test_identical_logits_give_zero_kld_and_full_agreement():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(70, 4096)) * 5).astype(np.float32)  # more rows than one block
    targets = rng.integers(0, 4096, size=70)
    ref = Reference.from_logits(logits, targets)
    st = compare(ref, logits.copy())
    assert np.all(st.kld == 0.0)
    assert st.same_top.all()
    np.testing.assert_array_equal(st.nll, st.nll_ref)
    assert np.all(st.dp == 0.0)
    acc = Accumulator()
    acc.add(st)
    s = acc.summary()
    assert s["kld_mean"] == 0.0 and s["kld_p99"] == 0.0 and s["kld_max"] == 0.0
    assert s["top1"] == 1.0
    assert s["ppl_delta"] == 0.0 and s["ppl"] == s["ppl_ref"]


def test_known_pair_of_distributions():
    # P = (1/2, 1/2), Q = (9/10, 1/10): KL = 1/2 ln(5/9) + 1/2 ln(5)
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)
    # shifting logits does not change the distributions
    assert kl_divergence(p + 3.0, q - 7.0)[0] == pytest.approx(expected, rel=1e-12)


def test_known_pair_large_vocabulary():
    # P uniform over V tokens; Q gives token 0 weight e^a / (e^a + V - 1), the rest 1/(e^a + V - 1).
    # KL(P||Q) = ln(Z / V) - a / V with Z = e^a + V - 1.
    V, a = 49152, 6.0
    p_logits = np.zeros((1, V))
    q_logits = np.zeros((1, V))
    q_logits[0, 0] = a
    Z = math.exp(a) + V - 1
    expected = math.log(Z / V) - a / V
    assert kl_divergence(p_logits, q_logits)[0] == pytest.approx(expected, rel=1e-10)
    # and the reverse direction, KL(Q||P) = sum q ln(q V) = (e^a/Z)(a - ln Z + ln V) + ((V-1)/Z)(ln V - ln Z)
    rev = (math.exp(a) / Z) * (a - math.log(Z) + math.log(V)) + ((V - 1) / Z) * (math.log(V) - math.log(Z))
    assert kl_divergence(q_logits, p_logits)[0] == pytest.approx(rev, rel=1e-10)


def test_compare_reports_top1_ppl_and_percentiles():
    V = 8
    ref_logits = np.zeros((4, V), dtype=np.float32)
    ref_logits[:, 1] = 2.0  # reference's top token is 1 everywhere
    targets = np.array([1, 1, 2, 3])
    cand = ref_logits.copy()
    cand[2:, 1] = 0.0
    cand[2:, 5] = 2.0  # candidate disagrees on the last two rows
    ref = Reference.from_logits(ref_logits, targets)
    st = compare(ref, cand)
    assert st.same_top.tolist() == [True, True, False, False]
    assert st.kld[0] == 0.0 and st.kld[1] == 0.0 and st.kld[2] > 0 and st.kld[2] == pytest.approx(st.kld[3])
    # analytic: P puts e^2/(e^2+7) on token 1, Q the same on token 5: KL = (p1 - p5) * ln(p1/p5) with p5 = 1/(e^2+7)
    z = math.exp(2) + 7
    p_hi, p_lo = math.exp(2) / z, 1 / z
    assert st.kld[2] == pytest.approx((p_hi - p_lo) * math.log(p_hi / p_lo), rel=1e-12)
    acc = Accumulator()
    acc.add(st)
    s = acc.summary()
    assert s["top1"] == 0.5
    assert s["n_tokens"] == 4
    assert s["ppl"] == pytest.approx(math.exp(st.nll.mean()))
    assert s["ppl_ref"] == pytest.approx(math.exp(st.nll_ref.mean()))
    assert s["kld_p99"] == pytest.approx(np.percentile(st.kld, 99))
    assert s["kld_mean"] == pytest.approx(st.kld.mean())


def test_shape_mismatch_is_an_error():
    ref = Reference.from_logits(np.zeros((3, 5), dtype=np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        compare(ref, np.zeros((3, 6), dtype=np.float32))
