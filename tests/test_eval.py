"""`pyllm-kv eval` end to end: tiny runs on the default model and the shipped corpus.

One small run (ctx 128, 3 chunks) through the CLI entry serves most tests; it
takes a few seconds on two cores.
"""

import argparse
import json
import os

import numpy as np
import pytest

from pyllm_kv import corpus
from pyllm_kv import eval as ev
from pyllm_kv.errors import FormatNotAvailable, UnknownCacheFormat


# ---------------------------------------------------------------- corpus


@pytest.fixture(scope="session")
def corpus_text():
    try:
        return corpus.load_text()
    except corpus.CorpusNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the evaluation corpus must be installed in CI: {exc}")
        pytest.skip(str(exc))


def test_corpus_is_clean_prose(corpus_text):
    text = corpus_text
    assert len(text) > 300_000
    assert text.startswith("PREFACE")
    assert "00-database" not in text and "Wiretap" not in text and "darkside" not in text
    assert "ABASEMENT, n." in text and text.rstrip().endswith("every two years.")


def test_corpus_missing_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(corpus.ENV_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setattr(corpus, "_DICT_DIRS", (str(tmp_path),))
    with pytest.raises(corpus.CorpusNotFoundError, match="apt-get install -y dict-devil"):
        corpus.load_text()


def test_read_text_file_strips_gutenberg_boilerplate(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("The Project Gutenberg eBook of X\nlicence blah\n"
                 "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nChapter 1\nIt was a dark night.\n"
                 "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert corpus.read_text_file(p) == "Chapter 1\nIt was a dark night.\n"


# ---------------------------------------------------------------- format names


def test_parse_formats():
    assert ev.parse_formats("f16, q8_0,q8_0/kv2,Q4_0,q8_0") == [
        ("f16", "f16", "f16"), ("q8_0", "q8_0", "q8_0"), ("q8_0/kv2", "q8_0", "kv2"), ("q4_0", "q4_0", "q4_0")]
    assert ev.parse_formats(["kv4/kv4"]) == [("kv4", "kv4", "kv4")]


def test_unknown_format_fails_before_any_model_run(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ev, "_load", no_model)
    monkeypatch.setattr(corpus, "load_text", no_model)
    with pytest.raises(UnknownCacheFormat, match="q4_0"):  # the message lists the valid names
        ev.evaluate(formats="f16,q4_0,q9_9")
    with pytest.raises(UnknownCacheFormat):
        ev.evaluate(formats="q8_0/nope")
    with pytest.raises(ev.EvalError):
        ev.evaluate(formats="f16,q8_0", ctx=7)
    # and through the CLI entry: a clean one-line error, exit code 2
    assert ev.main(["--formats", "f16,bogus", "--no-progress"]) == 2


def test_format_missing_from_library_fails_before_any_model_run(monkeypatch, lib_dir):
    from pyllm_kv import _libs

    if _libs.has_ggml_type("kv2"):
        pytest.skip("the library provides kv2 (patched build)")
    monkeypatch.setattr(ev, "_load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(FormatNotAvailable, match="kv2"):
        ev.evaluate(formats="f16,kv2")


# ---------------------------------------------------------------- one tiny run


def _args(**kw):
    parser = ev.add_arguments(argparse.ArgumentParser())
    argv = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        else:
            argv += [flag, str(v)]
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(lib_dir, model_path, corpus_text, tmp_path_factory):
    from pyllm_kv import _libs

    out = tmp_path_factory.mktemp("eval")
    fmts = ["f16", "q8_0", "q4_0"] + (["kv2"] if _libs.has_ggml_type("kv2") else [])
    args = _args(formats=",".join(fmts), ctx=128, chunks=3, json=out / "r.json", plot=out / "r.png",
                 rerun_reference=True, no_progress=True)
    # --json/--plot are stored as json_out/plot_out
    assert args.json_out and args.plot_out
    rc = ev.run_cli(args)
    assert rc == 0
    return out, json.loads((out / "r.json").read_text())


def test_json_and_png_written(tiny_run, capsys):
    out, data = tiny_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["complete"] is True
    s = data["settings"]
    assert s["ctx"] == 128 and s["chunks"] == 3 and s["scored_per_chunk"] == 63 and s["flash_attn"] is True
    for r in data["results"]:
        for key in ("format", "bits_k", "bits_v", "kv_bytes_per_token", "ppl", "kld_mean", "kld_p99", "top1"):
            assert key in r, key
        assert r["n_tokens"] == 3 * 63
        assert np.isfinite([r["ppl"], r["kld_mean"], r["kld_p99"], r["top1"]]).all()
    by = {r["format"]: r for r in data["results"]}
    assert by["q8_0"]["bits_k"] == 8.5 and by["q4_0"]["bits_v"] == 4.5
    assert by["f16"]["kv_bytes_per_token"] == 2 * by["q8_0"]["kv_bytes_per_token"] * 16 / 17


def test_f16_against_itself_is_exact(tiny_run):
    # run in its own context (--rerun-reference): llama.cpp on the CPU is deterministic
    _, data = tiny_run
    f16 = next(r for r in data["results"] if r["format"] == "f16")
    assert f16["is_reference"] is False
    assert f16["kld_mean"] == 0.0 and f16["kld_p99"] == 0.0 and f16["kld_max"] == 0.0
    assert f16["top1"] == 1.0
    assert f16["ppl_delta"] == 0.0


def test_more_bits_less_divergence(tiny_run):
    _, data = tiny_run
    by = {r["format"]: r for r in data["results"]}
    assert 0 < by["q8_0"]["kld_mean"] < by["q4_0"]["kld_mean"]
    assert by["q8_0"]["top1"] >= by["q4_0"]["top1"]


def test_q4_0_beats_kv2(tiny_run, require_format):
    require_format("kv2")
    _, data = tiny_run
    by = {r["format"]: r for r in data["results"]}
    assert by["q4_0"]["kld_mean"] < by["kv2"]["kld_mean"]


def test_ctrl_c_keeps_finished_chunks(lib_dir, model_path, corpus_text, monkeypatch):
    calls = {"n": 0}
    real_run = ev._Runner.run

    def run(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:  # chunk 1: ref + q4_0 done; chunk 2: ref done, then "Ctrl-C"
            raise KeyboardInterrupt
        return real_run(self, tokens)

    monkeypatch.setattr(ev._Runner, "run", run)
    res = ev.evaluate(formats="f16,q4_0", ctx=64, chunks=5, progress=False)
    assert res["interrupted"] is True and res["complete"] is False
    assert res["settings"]["chunks"] == 1
    assert [r["n_tokens"] for r in res["results"]] == [31, 31]
    table = ev.format_table(res)
    assert "interrupted" in table and "| q4_0 |" in table
