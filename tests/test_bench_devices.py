"""`pyllm-kv bench --device cpu,gpu` and `--ngl` on every command that loads a model.

No GPU here: the CPU half runs the real llama-bench on the `tiny` shape model;
the GPU half is checked through the commands it builds, with a stand-in
llama-bench that answers like the real one, and through its refusal on a
library without the CUDA backend. A few seconds in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pytest

from pyllm_kv import _libs, bench, cli, shape_model
from pyllm_kv import eval as ev


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shape_model.write_shape_model(tmp_path_factory.mktemp("shape") / "tiny.gguf",
                                         shape_model.resolve_spec("tiny"))


# tok/s the stand-in reports: (CPU, GPU) per cache type; llama-bench's -ngl tells the device
_SPEED = {"f16": (100.0, 1000.0), "q4_0": (80.0, 500.0), "kv4": (90.0, 1200.0)}


@pytest.fixture()
def fake_llama_bench(tmp_path):
    """An executable that prints llama-bench-like JSON and logs its argv (one line per call)."""
    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
        import json, sys
        a = sys.argv[1:]
        with open({str(log)!r}, "a") as fh:
            fh.write(json.dumps(a) + "\\n")
        get = lambda f: a[a.index(f) + 1]
        ngl = int(get("-ngl"))
        speed = {_SPEED!r}[get("-ctk")][0 if ngl == 0 else 1]
        recs = []
        for d in map(int, get("-d").split(",")):
            for n_p, n_g in ((int(get("-p")), 0), (0, int(get("-n")))):
                if n_p or n_g:
                    ts = speed * (4 if n_p else 1) / (1 + d / 1024)
                    recs.append(dict(n_prompt=n_p, n_gen=n_g, n_depth=d, avg_ts=ts, stddev_ts=0.0,
                                     samples_ts=[ts], backends="CUDA" if ngl else "CPU", n_threads=2,
                                     gpu_info="Fake GPU" if ngl else "", cpu_info="Fake CPU",
                                     model_type="llama ?B Q4_0"))
        print(json.dumps(recs))
        """))
    exe.chmod(0o755)
    return exe, log


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_cpu_and_gpu_in_one_run(tiny, fake_llama_bench, monkeypatch, tmp_path):
    exe, log = fake_llama_bench
    monkeypatch.setattr(bench, "cuda_backend", lambda llama_bench=None: tmp_path / "libggml-cuda.so")
    res = bench.run_bench(model=tiny, formats="kv4", devices="cpu,gpu", depths="0,1024", pp=16, tg=4, reps=1,
                          llama_bench=exe, progress=False)
    assert res["complete"] and res["settings"]["devices"] == ["cpu", "gpu"]
    calls = _calls(log)
    assert [(c[c.index("-ctk") + 1], c[c.index("-ngl") + 1]) for c in calls] == [
        ("f16", "0"), ("q4_0", "0"), ("kv4", "0"), ("f16", "99"), ("q4_0", "99"), ("kv4", "99")]
    assert all(c[c.index("-fa") + 1] == "on" and c[c.index("-d") + 1] == "0,1024" for c in calls)
    rows = {(r["device"], r["format"], r["test"], r["depth"]): r for r in res["results"]}
    assert len(rows) == 2 * 3 * 2 * 2
    # ratios against f16 / q4_0 of the same device
    assert rows[("cpu", "kv4", "tg", 1024)]["ratio_f16"] == pytest.approx(0.9)
    assert rows[("gpu", "kv4", "tg", 1024)]["ratio_f16"] == pytest.approx(1.2)
    assert rows[("gpu", "kv4", "pp", 0)]["ratio_q4_0"] == pytest.approx(2.4)
    # default bandwidth bound: GPU rows only
    assert rows[("gpu", "kv4", "tg", 0)]["bound_tok_s"] > 0 and "bound_tok_s" not in rows[("cpu", "kv4", "tg", 0)]
    assert res["settings"]["device_info"]["gpu"]["gpu_info"] == "Fake GPU"
    table = bench.format_table(res)
    assert "| kv4 | CPU | 4.5/4.5 | 1k | 45.00 |" in table and "| kv4 | GPU | 4.5/4.5 | 1k | 600.00 |" in table
    assert "same device" in table.splitlines()[0] and "-ngl 99" in table.splitlines()[0]
    png = bench.plot(res, tmp_path / "both.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_half_refused_without_cuda_backend(tiny, fake_llama_bench, capsys, lib_dir):
    exe, log = fake_llama_bench
    if bench.cuda_backend(exe) is not None:
        pytest.skip("this library has the CUDA backend")
    rc = cli.main(["bench", "--model", str(tiny), "--device", "cpu,gpu", "--formats", "kv4",
                   "--llama-bench", str(exe), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "libggml-cuda.so" in err and "--device cpu" in err
    assert _calls(log) == []  # refused before running anything, the CPU half included


def test_device_cpu_runs_the_real_llama_bench(tiny, tmp_path, capsys, lib_dir, require_format):
    require_format("kv4")
    try:
        bench.find_llama_bench()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    out = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", str(tiny), "--device", "cpu", "--formats", "kv4", "--depths", "0",
                   "--pp", "16", "--tg", "4", "--reps", "1", "--threads", "1", "--json", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["settings"]["devices"] == ["cpu"] and res["settings"]["ngl"] == 0
    assert {r["device"] for r in res["results"]} == {"cpu"} and all(r["tok_s"] > 0 for r in res["results"])
    assert all(run["command"][run["command"].index("-ngl") + 1] == "0" for run in res["runs"])


def test_device_and_ngl_input_errors(tiny):
    with pytest.raises(bench.BenchError, match="unknown device 'tpu'"):
        bench.parse_devices("cpu,tpu")
    assert bench.parse_devices(" GPU,cpu,gpu") == ["gpu", "cpu"]
    with pytest.raises(bench.BenchError, match="not both"):
        bench.run_bench(model=tiny, devices="cpu", ngl=99, llama_bench="/bin/true")
    with pytest.raises(bench.BenchError, match="-1 \\(all layers\\)"):
        bench.run_bench(model=tiny, ngl=-2, llama_bench="/bin/true")


def test_ngl_minus_one_means_all_layers(tiny, fake_llama_bench):
    exe, log = fake_llama_bench
    res = bench.run_bench(model=tiny, formats="f16", ngl=-1, depths="0", pp=16, tg=4, reps=1, llama_bench=exe,
                          progress=False)
    assert {c[c.index("-ngl") + 1] for c in _calls(log)} == {"-1"}
    assert res["settings"]["ngl"] == -1 and {r["device"] for r in res["results"]} == {"gpu"}


@pytest.mark.parametrize("argv", [
    ["generate", "--ngl", "-2", "Hi"],
    ["chat", "--ngl", "-5"],
    ["eval", "--ngl", "-2"],
    ["bench", "-ngl", "-3"],
])
def test_ngl_below_minus_one_is_an_error_naming_the_option(argv, capsys):
    assert cli.main(argv) == 2  # checked before any model is loaded or tool run
    err = capsys.readouterr().err
    assert err.startswith("pyllm-kv: error: ") and "--ngl" in err and "-1" in err and "Traceback" not in err


def test_ngl_not_a_number_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--ngl", "two", "Hi"])
    assert exc.value.code == 2 and "--ngl" in capsys.readouterr().err


def test_ngl_parses_minus_one_everywhere():
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "--ngl", "-1", "Hi"]).ngl == -1
    assert parser.parse_args(["chat", "--ngl", "99"]).ngl == 99
    assert ev.add_arguments(argparse.ArgumentParser()).parse_args(["--ngl", "-1"]).ngl == -1
    assert bench.add_arguments(argparse.ArgumentParser()).parse_args(["-ngl", "-1"]).ngl == -1


def test_generate_and_eval_with_ngl_minus_one_on_a_cpu_build(lib_dir, model_path, capsys, tmp_path):
    if (_libs.lib_dir() / "libggml-cuda.so").is_file():
        pytest.skip("a CUDA build: -1 would put the layers on the GPU")
    assert cli.main(["generate", "--ngl", "-1", "-n", "3", "--threads", "1", "The capital of France is"]) == 0
    assert capsys.readouterr().out.strip()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    res = ev.evaluate(model=model_path, text=text, formats="f16,q8_0", ctx=64, chunks=1, n_gpu_layers=-1,
                      n_threads=1, progress=False)
    assert res["settings"]["n_gpu_layers"] == -1 and res["results"][1]["n_tokens"] == 31
