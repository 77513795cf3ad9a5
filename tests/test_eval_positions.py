"""`pyllm-kv eval --score-from/--score-stride/--ubatch`: which positions are scored, the
KLD-by-position buckets, and one short real run that checks them against the default scoring."""

import json

import numpy as np
import pytest

from pyllm_kv import eval as ev
from pyllm_kv import eval_memory
from pyllm_kv.eval_journal import Journal
from pyllm_kv.eval_metrics import ChunkStats
from pyllm_kv.eval_positions import Scoring, bucket_edges, label
from pyllm_kv.eval_report import (build_report, by_position_plot_path, format_position_table, format_table,
                                  plot_by_position)


def test_scoring_positions():
    d = Scoring.default(128)
    assert d.is_default and list(d.positions()) == list(range(64, 127)) and len(d) == 63
    s = Scoring(1000, 0, 7)
    assert not s.is_default
    assert list(s.positions()[:3]) == [0, 7, 14] and s.positions()[-1] == 994 and len(s) == len(s.positions())
    assert "every 7-th" in s.describe()
    with pytest.raises(ValueError):
        Scoring(128, 127)  # nothing after the last position to predict
    with pytest.raises(ValueError):
        Scoring(128, 0, 0)
    # the memory estimate counts the same positions
    assert eval_memory.scored_positions(128) == 63
    assert eval_memory.scored_positions(1000, 0, 7) == len(s)


def test_bucket_edges():
    assert bucket_edges(512) == [(0, 512)]
    assert bucket_edges(8192) == [(0, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert bucket_edges(8193)[-1] == (4096, 8192)  # 8191 is the last scorable position
    assert bucket_edges(8194)[-1] == (8192, 16384)
    assert label(512, 1024) == "[512, 1k)" and label(2048, 4096) == "[2k, 4k)" and label(0, 512) == "[0, 512)"


def _stats(kld, same):
    n = len(kld)
    return ChunkStats(kld=np.asarray(kld, float), nll=np.ones(n), nll_ref=np.ones(n),
                      same_top=np.asarray(same, bool), dp=np.zeros(n))


def test_report_splits_by_position(tmp_path):
    # ctx 2048 scored from 256 every 256th: positions 256, 512, ..., 1792 (7 of them)
    sc = Scoring(2048, 256, 256)
    pos = sc.positions()
    assert list(pos) == [256, 512, 768, 1024, 1280, 1536, 1792]
    j = Journal(None, {})
    for c in range(2):
        j.add(c, "f16", _stats(np.zeros(7), np.ones(7)), 0.0, 0)
        # KLD = position / 1000 + chunk, top-1 wrong from position 1024 on
        j.add(c, "kv4", _stats(pos / 1000 + c, pos < 1024), 1.0, 2048)
    settings = {"ctx": 2048, "chunks": 0, "scored_positions": sc.describe(), "reference": "f16",
                "model": "m.gguf", "scored_per_chunk": len(sc)}
    pairs = [("f16", "f16", "f16"), ("kv4", "kv4", "kv4")]
    bits = {lb: {"bits_k": 16, "bits_v": 16, "bits_per_value": 16, "kv_bytes_per_token": 1, "cache_k": lb,
                 "cache_v": lb} for lb, _, _ in pairs}
    rep = build_report(settings, pairs, bits, {"f16"}, j, [0, 1], 2, False, True, 1.0, sc)
    kv4 = rep["results"][1]["by_position"]
    assert [(b["from"], b["to"], b["n_tokens"]) for b in kv4] == [(0, 512, 2), (512, 1024, 4), (1024, 2048, 8)]
    assert kv4[0]["kld_mean"] == pytest.approx(0.256 + 0.5)
    assert kv4[1]["kld_mean"] == pytest.approx((0.512 + 0.768) / 2 + 0.5)
    assert kv4[2]["kld_mean"] == pytest.approx((1.024 + 1.28 + 1.536 + 1.792) / 4 + 0.5)
    assert [b["top1"] for b in kv4] == [1.0, 1.0, 0.0]
    assert all(b["kld_mean"] == 0 for b in rep["results"][0]["by_position"])
    table = format_position_table(rep)
    assert "[1k, 2k)" in table and "| kv4 | 0.756 (100.0%) | 1.14 (100.0%) | 1.908 (0.0%) |" in table
    assert table in format_table(rep)
    pytest.importorskip("matplotlib")
    png = plot_by_position(rep, by_position_plot_path(tmp_path / "k.png"))
    assert png.name == "k-by-position.png" and png.read_bytes()[:4] == b"\x89PNG"
    # the default scoring has no buckets and no second table
    plain = build_report(settings, pairs, bits, {"f16"}, j, [0, 1], 2, False, True, 1.0, Scoring.default(2048))
    assert "by_position" not in plain["results"][1] and format_position_table(plain) == ""


def test_bad_scoring_fails_before_any_model_run(monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model must not be loaded for bad settings")

    monkeypatch.setattr(ev, "_load", no_model)
    with pytest.raises(ev.EvalError, match="score"):
        ev.evaluate(formats="f16", ctx=128, score_from=127)
    with pytest.raises(ev.EvalError, match="score"):
        ev.evaluate(formats="f16", ctx=128, score_stride=0)
    with pytest.raises(ev.EvalError, match="ubatch"):
        ev.evaluate(formats="f16", ctx=128, n_ubatch=129)


def _journal(path):
    lines = path.read_text().splitlines()[1:]
    return {(r["chunk"], r["format"]): np.asarray(r["kld"]) for r in map(json.loads, lines)}


def test_real_run_by_position(lib_dir, model_path, tmp_path):
    """ctx 768 scored everywhere every 8th position vs the default half-chunk scoring:
    the positions both score get the same KLD, and the report has two buckets."""
    kw = dict(model=model_path, formats="f16,q4_0", ctx=768, chunks=1, progress=False, n_threads=2, n_ubatch=256)
    full = ev.evaluate(json_out=tmp_path / "full.json", score_from=0, score_stride=8, **kw)
    half = ev.evaluate(json_out=tmp_path / "half.json", **kw)
    s = full["settings"]
    assert s["score_from"] == 0 and s["score_stride"] == 8 and s["scored_per_chunk"] == 96 and s["n_ubatch"] == 256
    q4 = full["results"][1]
    assert q4["n_tokens"] == 96 and [b["n_tokens"] for b in q4["by_position"]] == [64, 32]
    assert all(b["kld_mean"] > 0 for b in q4["by_position"])
    assert half["settings"]["scored_per_chunk"] == 383 and "by_position" not in half["results"][1]
    k_full = _journal(tmp_path / "full.passes.jsonl")[(0, "q4_0")]
    k_half = _journal(tmp_path / "half.passes.jsonl")[(0, "q4_0")]
    pos_full = np.arange(0, 767, 8)
    common = pos_full[pos_full >= 384]
    np.testing.assert_allclose(k_full[pos_full >= 384], k_half[common - 384], rtol=1e-3, atol=1e-6)
