"""pyllm-kv advise: candidate filtering by honest cost, the choice, the output."""

from __future__ import annotations

import pytest

from pyllm_kv import advise
from pyllm_kv.model_info import kv_cost, read_model_info


@pytest.fixture(scope="module")
def info(model_path):
    return read_model_info(model_path)


def test_candidates_fit_the_budget_with_side_state(info):
    got = advise.candidates(info, 4.5, 2048)
    names = {(c["k"], c["v"]) for c in got}
    assert ("q4_0", "q4_0") in names and ("kv4", "kv3") in names
    assert ("squat4", "kv4") not in names            # 4.5 + its side state > 4.5
    assert ("q8_0", "kv4") not in names
    for c in got:
        assert c["bits_per_value"] == pytest.approx(kv_cost(info, c["k"], c["v"], 2048)["bits_per_value"])
        assert c["bits_per_value"] <= 4.5
    assert [c["bits_per_value"] for c in got] == sorted(c["bits_per_value"] for c in got)


def test_nothing_fits_is_an_error(info, model_path):
    with pytest.raises(advise.AdviseError, match="raise --bits"):
        advise.advise(str(model_path), bits=1.5, ctx=512)


def test_picks_lowest_kld_and_prints_the_command(info, model_path, monkeypatch):
    import pyllm_kv.eval as ev

    seen = {}

    def fake_evaluate(model, text, formats, ctx, chunks, n_threads, progress, n_gpu_layers, squat=None):
        if squat is None:
            seen["formats"] = formats
        kld = {"kv4/kv3": 0.2, "squat3/kv3": 0.1}
        # as eval names them: a pair of one format by that format alone
        return {"results": [{"format": f.split("/")[0] if len(set(f.split("/"))) == 1 else f,
                             "kld_mean": kld.get(f, 0.5), "ppl": 40.0, "ppl_delta_pct": 3.0,
                             "top1": 0.9} for f in formats]}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    res = advise.advise(str(model_path), bits=4.0, ctx=2048, progress=False)
    assert "kv3/kv3" in {r["format"] for r in res["rows"]}   # reported as "kv3", still a row
    assert seen["formats"][0] == "f16" and "kv4/kv4" not in seen["formats"]
    assert (res["best"]["k"], res["best"]["v"]) == ("squat3", "kv3")
    text = advise.format_advice(res)
    assert "--cache-k squat3 --cache-v kv3" in text and "<- best" in text


def test_centred_pairs_in_a_second_pass(info, model_path, monkeypatch):
    """The plain pairs of ours again with keys centred: costed with the centre row,
    evaluated with center=k, and printed with the setting that reproduces them."""
    import pyllm_kv.eval as ev

    passes = []

    def fake_evaluate(model, text, formats, ctx, chunks, n_threads, progress, n_gpu_layers, squat=None):
        centre = squat.center if squat is not None else None
        passes.append((centre, list(formats)))
        kld = {(None, "kv4/kv3"): 0.2, ("k", "kv4/kv3"): 0.05}
        return {"results": [{"format": f, "kld_mean": kld.get((centre, f), 0.5), "ppl": 40.0,
                             "ppl_delta_pct": 3.0, "top1": 0.9} for f in formats]}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    res = advise.advise(str(model_path), bits=4.5, ctx=2048, progress=False)
    assert [c for c, _ in passes] == [None, "k"]
    centred = passes[1][1]
    assert centred[0] == "f16" and "kv4/kv3" in centred and not any(f.startswith(("squat", "q")) for f in centred)
    assert "kv4/kv4" not in centred                  # 4.5 + the centre row > 4.5
    b = res["best"]
    assert (b["k"], b["v"], b["center"], b["format"]) == ("kv4", "kv3", "k", "kv4/kv3 ck")
    assert b["bits_per_value"] == pytest.approx(kv_cost(info, "kv4", "kv3", 2048, center="k")["bits_per_value"])
    assert b["bits_per_value"] > kv_cost(info, "kv4", "kv3", 2048)["bits_per_value"]
    text = advise.format_advice(res)
    assert "--cache-k kv4 --cache-v kv3 --squat-center k" in text
    assert "squat=pyllm_kv.SquatOptions(center='k')" in text
