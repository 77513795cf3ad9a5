"""`pyllm-kv eval` pieces from issue 21: the statistics reduced block by block
equal the whole-chunk ones, the on-disk reference reads back what was written,
the report and the journal are on disk after every pass, and --resume carries
an interrupted run to the same numbers as an uninterrupted one.

The model runs use SmolLM2 at ctx 64 (a few seconds)."""

import json
import os

import numpy as np
import pytest

from pyllm_kv import corpus
from pyllm_kv import eval as ev
from pyllm_kv.eval_journal import Journal, JournalMismatch, journal_path
from pyllm_kv.eval_metrics import ChunkStats, Reference, block_stats, compare, rows_per_block
from pyllm_kv.eval_reference import ReferenceStore


# ---------------------------------------------------------------- no model


def test_block_stats_equal_whole_chunk_compare():
    rng = np.random.default_rng(3)
    n, V = 37, 5000
    ref_logits = (rng.normal(size=(n, V)) * 4).astype(np.float32)
    cand = ref_logits + (rng.normal(size=(n, V)) * 0.3).astype(np.float32)
    targets = rng.integers(0, V, size=n)
    whole = compare(Reference.from_logits(ref_logits, targets), cand)
    parts = [block_stats(ref_logits[s:s + 5], cand[s:s + 5], targets[s:s + 5]) for s in range(0, n, 5)]
    blocks = ChunkStats.concat(parts)
    for f in ChunkStats.FIELDS:  # the same numbers, bit for bit
        np.testing.assert_array_equal(getattr(blocks, f), getattr(whole, f), err_msg=f)
    self_cmp = ChunkStats.concat([block_stats(ref_logits[s:s + 8], None, targets[s:s + 8]) for s in range(0, n, 8)])
    assert np.all(self_cmp.kld == 0) and self_cmp.same_top.all() and np.all(self_cmp.dp == 0)
    np.testing.assert_array_equal(self_cmp.nll, whole.nll_ref)
    assert rows_per_block(262144) == 8 and rows_per_block(49152) == 42 and rows_per_block(100) == 64


def test_reference_store_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(23, 300)).astype(np.float32)
    with ReferenceStore(300, block_rows=4, directory=tmp_path) as store:
        assert not os.listdir(tmp_path)  # unlinked at creation: nothing left behind, even after a crash
        for s, e in ((0, 10), (10, 11), (11, 23)):  # slices as llama_decode returns them
            store.append(rows[s:e])
        got = np.concatenate([b.copy() for _, b in store.blocks(0, 23)])
        np.testing.assert_array_equal(got, rows)
        np.testing.assert_array_equal(store.read(19, 23), rows[19:23])
        with pytest.raises(IndexError):
            store.read(20, 25)
        store.reset()  # next chunk overwrites
        store.append(rows[5:7])
        np.testing.assert_array_equal(store.read(0, 2), rows[5:7])
        with pytest.raises(IndexError):
            store.read(0, 3)


def test_journal_refuses_other_settings_and_skips_a_torn_line(tmp_path):
    p = journal_path(tmp_path / "r.json")
    assert p.name == "r.passes.jsonl"
    st = ChunkStats(np.array([0.5, 0.25]), np.array([1.0, 2.0]), np.array([1.5, 2.5]), np.array([True, False]),
                    np.array([0.1, -0.2]))
    j = Journal(p, {"ctx": 64}, resume=False)
    j.add(0, "q4_0", st, 1.5, 64)
    with open(p, "a") as fh:
        fh.write('{"chunk": 1, "format": "q4_')  # killed while writing
    back = Journal(p, {"ctx": 64}, resume=True)
    assert back.resumed == 1 and back.has(0, "q4_0") and not back.has(1, "q4_0")
    for f in ChunkStats.FIELDS:
        np.testing.assert_array_equal(getattr(back.records[(0, "q4_0")].stats, f), getattr(st, f))
    assert len(p.read_text().splitlines()) == 2  # the torn line is gone before anything is appended
    with pytest.raises(JournalMismatch, match="ctx: 64 there, 128 here"):
        Journal(p, {"ctx": 128}, resume=True)
    assert Journal(p, {"ctx": 128}, resume=False).records == {}  # without --resume: a new journal


# ---------------------------------------------------------------- model runs


@pytest.fixture(scope="module")
def corpus_text():
    try:
        return corpus.load_text()
    except corpus.CorpusNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the evaluation corpus must be installed in CI: {exc}")
        pytest.skip(str(exc))


def _numbers(result):
    return [{k: v for k, v in r.items() if k != "prefill_tok_s"} for r in result["results"]]


def test_report_on_disk_after_every_pass_and_resume(lib_dir, model_path, corpus_text, tmp_path, monkeypatch):
    common = dict(model=model_path, formats="f16,q4_0", ctx=64, chunks=2, progress=False, n_threads=1)
    full = ev.evaluate(json_out=tmp_path / "full.json", **common)
    assert full["complete"] and full["settings"]["chunks"] == 2

    # a run that dies during chunk 2 (an exception, not Ctrl-C: nothing gets to write a final report)
    real_run = ev._Runner.run
    calls = {"n": 0}

    def crashing(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:  # chunk 1: reference, q4_0; chunk 2: reference, then q4_0 dies
            raise RuntimeError("simulated crash")
        return real_run(self, tokens)

    monkeypatch.setattr(ev._Runner, "run", crashing)
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="simulated crash"):
        ev.evaluate(json_out=out, **common)
    snap = json.loads(out.read_text())  # written after chunk 2's f16 entry, the last finished pass
    assert snap["in_progress"] is True and snap["complete"] is False
    assert snap["settings"]["chunks"] == 1 and [r["n_tokens"] for r in snap["results"]] == [31, 31]
    lines = journal_path(out).read_text().splitlines()
    assert len(lines) == 1 + 3  # header; chunk 1: f16, q4_0; chunk 2: f16

    # --resume runs only what is missing: chunk 2's reference and q4_0
    passes = []

    def counting(self, tokens):
        passes.append(self.label)
        return real_run(self, tokens)

    monkeypatch.setattr(ev._Runner, "run", counting)
    resumed = ev.evaluate(json_out=out, resume=True, **common)
    assert passes == ["f16 (reference)", "q4_0"]
    assert resumed["complete"] and resumed["settings"]["chunks"] == 2
    assert _numbers(resumed) == _numbers(full)
    final = json.loads(out.read_text())
    assert final["complete"] is True and "in_progress" not in final and _numbers(final) == _numbers(full)

    # nothing left to do: no model pass at all
    again = ev.evaluate(json_out=out, resume=True, **common)
    assert len(passes) == 2 and _numbers(again) == _numbers(full)

    # other settings: refused, naming the difference
    with pytest.raises(JournalMismatch, match="ctx: 64 there, 128 here"):
        ev.evaluate(json_out=out, resume=True, **{**common, "ctx": 128, "chunks": 1})
    with pytest.raises(ev.EvalError, match="--json"):
        ev.evaluate(resume=True, **common)
