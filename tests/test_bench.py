"""`pyllm-kv bench` and the shape-model generator.

* pyllm_kv.shape_model writes a `tiny` random-weight GGUF that read_model_info
  reads back with the right numbers, whose weights are finite and small, and
  that llama-bench runs (one CPU run per format, pp16/tg4 at depth 0, 1 rep);
* the table / ratio / bytes-per-token arithmetic on synthetic llama-bench JSON;
* bad input gives clear errors before anything runs.

Everything here takes a few seconds on two cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pyllm_kv import bench, cli, formats, shape_model
from pyllm_kv.errors import LibraryNotFound, PyllmKvError, UnknownCacheFormat
from pyllm_kv.model_info import ModelInfo, read_model_info


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shape_model.write_shape_model(tmp_path_factory.mktemp("shape") / "tiny.gguf",
                                         shape_model.resolve_spec("tiny"))


# ---------------------------------------------------------------- shape model


def test_tiny_shape_model_reads_back(tiny):
    spec = shape_model.PRESETS["tiny"]
    info = read_model_info(tiny)
    assert info.arch == "llama"
    assert (info.n_layer, info.n_head, info.n_head_kv, info.head_dim_k, info.head_dim_v, info.n_vocab) == (
        spec.n_layer, spec.n_head, spec.n_head_kv, spec.head_dim, spec.head_dim, spec.n_vocab) == (2, 4, 2, 64, 64, 512)
    assert info.n_ctx_train == spec.n_ctx_train

    import gguf

    reader = gguf.GGUFReader(str(tiny))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * spec.n_layer
    assert sum(int(t.n_bytes) for t in tensors.values()) == shape_model.weights_nbytes(spec, "q4_0")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == spec.n_vocab
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<unk>", "<s>", "</s>"]
    # weights: valid Q4_0 blocks, finite, std about 1/sqrt(row length)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        row = int(t.shape[0])
        assert np.isfinite(w).all()
        assert 0.5 / math.sqrt(row) < float(w.std()) < 2 / math.sqrt(row), name
    norm = gguf.quants.dequantize(tensors["blk.0.attn_norm.weight"].data, gguf.GGMLQuantizationType.F32)
    assert (norm == 1).all()


def test_shape_model_f16_and_seed(tmp_path):
    import gguf

    spec = shape_model.resolve_spec("tiny", n_layer=1, n_vocab=100)
    a = shape_model.write_shape_model(tmp_path / "a.gguf", spec, "f16", seed=1)
    b = shape_model.write_shape_model(tmp_path / "b.gguf", spec, "f16", seed=1)
    assert a.read_bytes() == b.read_bytes()  # deterministic
    assert not list(tmp_path.glob("*.part"))
    info = read_model_info(a)
    assert (info.n_layer, info.n_vocab) == (1, 100)  # < 259 tokens: no byte tokens, still loads
    t = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    w = np.asarray(t.data, dtype=np.float32)
    assert np.isfinite(w).all() and 0.5 / 16 < float(np.abs(w).mean()) < 2 / 16


def test_presets_and_sizes():
    spec = shape_model.resolve_spec("llama8b")
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim, spec.n_ff, spec.n_vocab) == (
        32, 4096, 32, 8, 128, 14336, 128256)
    assert abs(shape_model.n_params(spec) - 8.03e9) < 0.01e9  # Llama-3.1-8B's parameter count
    assert 4.2 < shape_model.weights_nbytes(spec, "q4_0") / 2**30 < 4.4
    custom = shape_model.resolve_spec("tiny", n_layer=3)
    assert custom.n_layer == 3 and custom.name != shape_model.PRESETS["tiny"].name
    assert shape_model.cache_name(custom) != shape_model.cache_name(shape_model.PRESETS["tiny"])


def test_shape_model_bad_input(tmp_path):
    E = shape_model.ShapeModelError
    with pytest.raises(E, match="unknown shape preset"):
        shape_model.resolve_spec("llama9b")
    with pytest.raises(E, match="multiple of n_head_kv"):
        shape_model.resolve_spec("tiny", n_head_kv=3)
    with pytest.raises(E, match="multiple of 32"):
        shape_model.resolve_spec("tiny", n_embd=100)
    with pytest.raises(E, match="positive integer"):
        shape_model.resolve_spec("tiny", n_layer=0)
    with pytest.raises(E, match="unknown weight type"):
        shape_model.write_shape_model(tmp_path / "x.gguf", shape_model.PRESETS["tiny"], "q3_k")
    assert not (tmp_path / "x.gguf").exists()
    assert shape_model.main(["--preset", "nope", "--out", str(tmp_path / "y.gguf")]) == 2


def test_ensure_shape_model_caches(tmp_path):
    p = shape_model.ensure_shape_model("tiny", cache_dir=tmp_path)
    mtime = p.stat().st_mtime_ns
    assert shape_model.ensure_shape_model("tiny", cache_dir=tmp_path) == p
    assert p.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- llama-bench on the tiny model


def _llama_bench():
    try:
        return bench.find_llama_bench()
    except LibraryNotFound as exc:
        pytest.skip(str(exc))


def test_bench_runs_tiny(tmp_path, capsys, lib_dir, require_format):
    require_format("kv4")
    _llama_bench()
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli.main(["bench", "--shape", "tiny", "--shape-dir", str(tmp_path / "cache"), "--formats", "kv4",
                   "--depths", "0", "--pp", "16", "--tg", "4", "--reps", "1", "--threads", "1",
                   "--bandwidth", "10", "--json", str(out_json), "--plot", str(out_png), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    assert result["complete"] and result["settings"]["formats"] == ["f16", "q4_0", "kv4"]
    got = {(r["format"], r["test"]): r for r in result["results"]}
    assert set(got) == {(f, t) for f in ("f16", "q4_0", "kv4") for t in ("pp", "tg")}
    for r in result["results"]:
        assert r["depth"] == 0 and r["tok_s"] > 0 and r["n"] == (16 if r["test"] == "pp" else 4)
    assert got[("f16", "tg")]["ratio_f16"] == 1.0 and got[("q4_0", "pp")]["ratio_q4_0"] == 1.0
    assert got[("kv4", "tg")]["bound_tok_s"] > 0
    run = next(r for r in result["runs"] if r["format"] == "kv4")
    assert run["command"][run["command"].index("-ctk") + 1] == "kv4" and "-fa" in run["command"]
    assert "| kv4 | 4.5/4.5 | 0 |" in out and "Decode (tg4)" in out and "Prefill (pp16)" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- arithmetic on synthetic JSON


def _rec(k, v, n_prompt, n_gen, depth, ts, sd=0.0):
    return {"type_k": k, "type_v": v, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth,
            "avg_ts": ts, "stddev_ts": sd, "samples_ts": [ts], "model_type": "llama ?B Q4_0",
            "backends": "CPU", "cpu_info": "test CPU", "n_threads": 2}


INFO = ModelInfo(path="/x/m.gguf", arch="llama", name="m", n_layer=2, n_head=4, n_head_kv=2, head_dim_k=64,
                 head_dim_v=64, n_ctx_train=4096, n_vocab=512, has_chat_template=False,
                 n_head_kv_per_layer=[2, 2])
SPEED = {"f16": (100.0, 50.0, 400.0, 200.0), "q4_0": (80.0, 20.0, 300.0, 100.0), "kv4": (90.0, 40.0, 380.0, 190.0)}


def _runs(with_q4_at_depth=True):
    runs = []
    for f, (tg0, tg1k, pp0, pp1k) in SPEED.items():
        recs = [_rec(f, f, 0, 8, 0, tg0), _rec(f, f, 64, 0, 0, pp0), _rec(f, f, 0, 8, 1024, tg1k),
                _rec(f, f, 64, 0, 1024, pp1k), _rec(f, f, 64, 8, 0, 1.0)]  # a pg test: ignored
        if f == "q4_0" and not with_q4_at_depth:
            recs = recs[:2]
        runs.append({"format": f, "cache_k": f, "cache_v": f, "bits_k": formats.resolve(f).bits,
                     "bits_v": formats.resolve(f).bits, "records": recs, "error": None})
    return runs


def test_analyze_ratios_and_floor():
    weights = 1_000_000
    rows = bench.analyze(_runs(), INFO, weights, bandwidth_gbs=100.0)
    assert len(rows) == 12
    r = {(x["format"], x["test"], x["depth"]): x for x in rows}
    assert r[("kv4", "tg", 1024)]["ratio_f16"] == pytest.approx(40 / 50)
    assert r[("kv4", "tg", 1024)]["ratio_q4_0"] == pytest.approx(40 / 20)
    assert r[("kv4", "pp", 0)]["ratio_f16"] == pytest.approx(380 / 400)
    assert r[("f16", "pp", 1024)]["ratio_f16"] == 1.0
    # K+V values per token: 2 layers x 2 KV heads x (64 + 64) = 512
    for f, bytes_per_tok in (("f16", 512 * 2), ("kv4", 512 * 4.5 / 8), ("q4_0", 512 * 4.5 / 8)):
        row = r[(f, "tg", 1024)]
        assert row["kv_tokens"] == 1024 + 8 / 2
        assert row["kv_bytes"] == pytest.approx(bytes_per_tok * 1028)
        assert row["bytes_per_token"] == pytest.approx(weights + bytes_per_tok * 1028)
        assert row["bound_tok_s"] == pytest.approx(100e9 / (weights + bytes_per_tok * 1028))
        assert row["bound_fraction"] == pytest.approx(row["tok_s"] / row["bound_tok_s"])
    assert "bytes_per_token" not in r[("kv4", "pp", 1024)]  # no floor for prefill
    # no bandwidth: the floor in bytes, no bound
    rows = bench.analyze(_runs(), INFO, weights, bandwidth_gbs=None)
    assert all("bound_tok_s" not in x for x in rows) and all("bytes_per_token" in x for x in rows if x["test"] == "tg")


def _result(runs, bandwidth):
    rows = bench.analyze(runs, INFO, 1e6, bandwidth)
    settings = {"model": "/x/m.gguf", "model_name": "m", "model_type": "llama ?B Q4_0", "n_layer": 2,
                "n_head_kv": 2, "head_dim_k": 64, "ngl": 0, "threads": 2, "reps": 1, "backends": "CPU",
                "cpu_info": "test CPU", "gpu_info": "", "bandwidth_gbs": bandwidth, "depths": [0, 1024]}
    return {"settings": settings, "runs": runs, "results": rows, "complete": all(not r["error"] for r in runs)}


def test_table_and_plot_from_synthetic(tmp_path):
    runs = _runs(with_q4_at_depth=False)
    runs.append({"format": "kv2", "cache_k": "kv2", "cache_v": "kv2", "bits_k": 2.5, "bits_v": 2.5,
                 "records": [], "error": "llama-bench exited with status 134; its last messages:\nGGML_ASSERT"})
    text = bench.format_table(_result(runs, 100.0))
    lines = text.splitlines()
    assert "incomplete" in lines[0] and "2 threads" in lines[0]
    assert "| kv4 | 4.5/4.5 | 1k | 40.00 | 0.00 | 0.80 | – | 1.30 |" in "\n".join(lines)  # no q4_0 at 1k
    assert any(ln.startswith("| f16 | 16/16 | 0 | 100.00 | 0.00 | 1.00 | 1.25 |") for ln in lines)
    assert "bound tok/s @ 100 GB/s" in text and "- kv2: llama-bench exited with status 134" in text
    assert "Prefill (pp64)" in text and "Decode (tg8)" in text
    no_bw = bench.format_table(_result(_runs(), None))
    assert "bound" not in no_bw and "MB/token floor" in no_bw and "incomplete" not in no_bw
    png = bench.plot(_result(runs, 100.0), tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    js = bench.write_json(_result(runs, None), tmp_path / "r.json")
    assert json.loads(js.read_text())["results"][0]["format"] == "f16"


def test_parse_llama_bench_json():
    recs = [_rec("f16", "f16", 0, 8, 0, 10.0), _rec("f16", "f16", 64, 0, 0, 20.0)]
    full = json.dumps(recs, indent=2)
    assert bench.parse_llama_bench_json(full) == recs
    # a run that crashed after the first record: the array is never closed
    cut = full[: full.index("}") + 1] + ",\n  {\n    \"n_prompt\": 6"
    assert bench.parse_llama_bench_json(cut) == recs[:1]
    assert bench.parse_llama_bench_json("") == []


# ---------------------------------------------------------------- inputs and errors


def test_parse_formats_and_depths():
    assert bench.parse_formats("kv4, q8_0/kv2,KV4,f16") == [
        ("f16", "f16", "f16"), ("q4_0", "q4_0", "q4_0"), ("kv4", "kv4", "kv4"), ("q8_0/kv2", "q8_0", "kv2")]
    default = [p[0] for p in bench.parse_formats(None)]
    assert default[:2] == ["f16", "q4_0"]
    assert {f.name for f in formats.FORMATS.values() if f.is_ours} <= set(default)  # from the registry
    assert all("/" not in label for label in default)  # no mixed pairs unless asked
    assert bench.parse_depths("8k, 0,2048,2048") == [0, 2048, 8192]
    assert bench.parse_depths([0, 512]) == [0, 512]
    cmd = bench.build_command("/b/llama-bench", "/m.gguf", "q8_0", "kv2", [0, 2048], 512, 32, 2, threads=2, ngl=99)
    assert cmd[cmd.index("-ctk") + 1] == "q8_0" and cmd[cmd.index("-ctv") + 1] == "kv2"
    assert cmd[cmd.index("-d") + 1] == "0,2048" and cmd[cmd.index("-fa") + 1] == "on"
    assert cmd[cmd.index("-o") + 1] == "json" and cmd[cmd.index("-ngl") + 1] == "99"


@pytest.mark.parametrize("depths", ["0,-1", "abc", "", "1.5", "0,,x"])
def test_bad_depths(depths):
    with pytest.raises(bench.BenchError, match="depth"):
        bench.parse_depths(depths)


def test_bad_settings(tiny):
    with pytest.raises(UnknownCacheFormat, match="valid formats: .*kv4"):
        bench.run_bench(model=tiny, formats="kv4,kv9")
    for kwargs, msg in (({"pp": 0, "tg": 0}, "nothing to run"), ({"reps": 0}, "reps"),
                        ({"bandwidth_gbs": -1.0}, "bandwidth"), ({"ngl": -2}, "ngl"),
                        ({"threads": 0}, "threads"), ({"depths": "0,x"}, "depth")):
        with pytest.raises(bench.BenchError, match=msg):
            bench.run_bench(model=tiny, formats="f16", **kwargs)
    with pytest.raises(LibraryNotFound, match="llama-bench"):
        bench.run_bench(model=tiny, formats="f16", llama_bench="/nonexistent/llama-bench")
    with pytest.raises(bench.BenchError, match="not both"):
        bench.run_bench(model=tiny, shape="tiny", formats="f16", llama_bench="/bin/true")


def test_cli_errors(capsys, tmp_path):
    rc = cli.main(["bench", "--formats", "kv4,bogus", "--model", str(tmp_path / "m.gguf")])
    assert rc == 2 and "unknown cache format 'bogus'" in capsys.readouterr().err
    rc = cli.main(["bench", "--depths", "0,-5", "--model", str(tmp_path / "m.gguf")])
    assert rc == 2 and "bad depth '-5'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive
        cli.main(["bench", "--model", "x.gguf", "--shape", "tiny"])
    assert exc.value.code == 2
    rc = cli.main(["bench", "--model", str(tmp_path / "missing.gguf"), "--formats", "f16",
                   "--llama-bench", "/bin/true"])
    err = capsys.readouterr().err
    assert rc == 2 and "model file not found" in err
    assert issubclass(bench.BenchError, PyllmKvError)


def test_split_options_reach_llama_bench():
    """Several GPUs (issue 19): --split/--tensor-split become llama-bench's -sm/-ts."""
    cmd = bench.build_command("/b/llama-bench", "/m.gguf", "kv4", "kv4", [0], 512, 32, 2, ngl=99,
                              split="row", tensor_split=[3.0, 1.0])
    assert cmd[cmd.index("-sm") + 1] == "row" and cmd[cmd.index("-ts") + 1] == "3/1"
    plain = bench.build_command("/b/llama-bench", "/m.gguf", "kv4", "kv4", [0], 512, 32, 2, ngl=99)
    assert "-sm" not in plain and "-ts" not in plain
    with pytest.raises(bench.BenchError, match="split"):
        bench.run_bench(formats="kv4", split="diagonal", ngl=99)
    with pytest.raises(bench.BenchError, match="tensor-split"):
        bench._tensor_split_arg("1,x")


def test_llama70b_preset_is_the_two_gpu_shape():
    """docs/multi-gpu.md's 2-GPU run: Llama-3.1-70B's layout, ~40 GB of Q4_0 weights."""
    spec = shape_model.PRESETS["llama70b"]
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim) == (80, 8192, 64, 8, 128)
    assert 38e9 < shape_model.weights_nbytes(spec, "q4_0") < 42e9
