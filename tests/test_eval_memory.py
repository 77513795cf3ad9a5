"""`pyllm-kv eval` memory (issue 21): peak RSS does not grow with the number of
formats, the estimate is an upper bound, and a run that does not fit is refused
before anything is loaded, naming a --ctx that fits.

The two RSS runs (SmolLM2, ctx 256, one chunk, 2 and 8 formats) take about
20 s together on two idle cores.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyllm_kv
from pyllm_kv import eval as ev
from pyllm_kv import eval_memory

# Peak RSS of the child itself: VmHWM of its address space. Not getrusage's ru_maxrss,
# which carries over the peak of the process it was forked from (the whole pytest run).
_CHILD = """
import sys
sys.path.insert(0, {pkg_parent!r})
from pyllm_kv.eval import main
rc = main(sys.argv[1:])
hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print("PEAK_RSS_KB", hwm[0], file=sys.stderr)
sys.exit(rc)
"""


def _peak_rss(tmp_path, name, formats):
    """Run `pyllm-kv eval` in a child process; (peak RSS in bytes, its JSON report)."""
    out = tmp_path / f"{name}.json"
    code = _CHILD.format(pkg_parent=str(Path(pyllm_kv.__file__).resolve().parent.parent))
    argv = ["--ctx", "256", "--chunks", "1", "--threads", "1", "--no-progress",
            "--formats", ",".join(formats), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    assert kb, proc.stderr[-3000:]
    return kb[0] * 1024, json.loads(out.read_text())


def test_peak_rss_independent_of_format_count(lib_dir, model_path, tmp_path):
    from pyllm_kv import _libs

    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc/<pid>/status (Linux)")
    ours = [f for f in ("kv4", "kv3", "kv2") if _libs.has_ggml_type(f)]
    eight = (["f16", "q8_0", "q5_0", "q4_0", "iq4_nl"] + ours + ["q5_1", "q4_1"])[:8]
    rss2, rep2 = _peak_rss(tmp_path, "two", ["f16", "q8_0"])
    rss8, rep8 = _peak_rss(tmp_path, "eight", eight)
    assert [r["format"] for r in rep8["results"]] == eight
    assert all(r["n_tokens"] == 127 for r in rep2["results"] + rep8["results"])
    # Before issue 21 every format kept its own model and context: about 3x here.
    assert rss8 <= 1.3 * rss2, (rss2 / 2**20, rss8 / 2**20)
    # the estimate the run checked against is an upper bound of what it used
    for rss, rep in ((rss2, rep2), (rss8, rep8)):
        assert rss <= rep["settings"]["memory_estimate"]["total_bytes"], (rss, rep["settings"]["memory_estimate"])


def _no_model(*a, **k):
    raise AssertionError("the model was loaded")


def test_refuses_what_does_not_fit_and_names_a_ctx_that_does(lib_dir, model_path, monkeypatch, capsys):
    from pyllm_kv.model_info import read_model_info

    info = read_model_info(model_path)
    pairs = ev.parse_formats("f16,q4_0")
    shape = ev._model_shape(info, Path(model_path), pairs, 0, "hadamard")
    rss = eval_memory.process_rss()
    need = {c: eval_memory.estimate(shape, c, 4, rss).total - rss for c in (1024, 4096)}
    avail = (need[1024] + need[4096]) // 2  # 1024 fits, 4096 does not
    monkeypatch.setattr(eval_memory, "available_memory", lambda: (avail, "MemAvailable (test)"))
    monkeypatch.setattr(ev, "_load", _no_model)

    with pytest.raises(eval_memory.NotEnoughMemory) as exc:
        ev.evaluate(model=model_path, formats="f16,q4_0", ctx=4096, chunks=4, progress=False)
    msg = str(exc.value)
    assert "--ctx 4096" in msg and "MemAvailable (test)" in msg and "logits buffer" in msg
    suggested = int(msg.split("--ctx ")[2].split()[0])  # "... --ctx N would fit"
    assert 1024 <= suggested < 4096 and suggested % 256 == 0
    assert eval_memory.estimate(shape, suggested, 4, rss).total - rss <= avail
    assert eval_memory.estimate(shape, suggested + 256, 4, rss).total - rss > avail

    # the CLI: one line, exit code 2, nothing loaded
    rc = ev.main(["--model", str(model_path), "--formats", "f16,q4_0", "--ctx", "4096", "--chunks", "4",
                  "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pyllm-kv eval: error:" in err and "would fit" in err

    # too little for anything: says so instead of naming a ctx
    monkeypatch.setattr(eval_memory, "available_memory", lambda: (1 << 20, "MemAvailable (test)"))
    with pytest.raises(eval_memory.NotEnoughMemory, match="not even the smallest --ctx fits"):
        ev.evaluate(model=model_path, formats="f16,q4_0", ctx=512, chunks=1, progress=False)


def test_refuses_when_the_reference_file_does_not_fit_on_disk(lib_dir, model_path, monkeypatch, tmp_path):
    import shutil

    real = shutil.disk_usage

    def small_disk(path):
        return real(path)._replace(free=10 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    monkeypatch.setattr(ev, "_load", _no_model)
    with pytest.raises(eval_memory.NotEnoughMemory, match="--tmp-dir") as exc:
        ev.evaluate(model=model_path, formats="f16,q4_0", ctx=2048, chunks=1, progress=False, tmp_dir=tmp_path)
    # the largest ctx whose (ctx/2 - 1) x 49152 x 4 B reference fits in 10 MiB
    ok = max(c for c in range(8, 2048, 2) if (c - 1 - c // 2) * 49152 * 4 <= 10 * 2**20)
    assert f"--ctx {ok}." in str(exc.value)


def test_largest_fitting_ctx():
    f = eval_memory.largest_fitting_ctx
    assert f(lambda c: c <= 5000, 8192) == 4864  # multiples of 256 first
    assert f(lambda c: c <= 100, 8192) == 100  # then even numbers
    assert f(lambda c: c <= 7, 8192) is None
    assert f(lambda c: True, 512) == 256


def test_available_memory_reads_meminfo():
    got = eval_memory.available_memory()
    if not Path("/proc/meminfo").is_file():
        assert got is None
        return
    avail, source = got
    assert 0 < avail and ("MemAvailable" in source or "cgroup" in source)


def test_estimate_parts_follow_the_memory_math():
    shape = eval_memory.ModelShape(model_bytes=250 * 2**20, n_vocab=262144, attn_width=1024,
                                   kv_bytes_per_token=18432, side_state_bytes=0, n_formats=10)
    est = eval_memory.estimate(shape, 8192, 1, process_bytes=100 * 2**20)
    p = est.parts
    assert p["logits buffer"] == 4 * 512 * 262144
    assert p["KV cache"] == 18432 * 8192
    assert p["compute buffer"] == 512 * (4 * 262144 + 8 * 1024) + 4 * 512 * 8192
    assert est.disk_bytes == 4 * 4095 * 262144
    assert est.total < 2.5 * 2**30  # Gemma-3-270M at ctx 8192: the acceptance run's shape
    # ten times the formats: only the per-position results grow (40 B per position and format)
    more = eval_memory.estimate(dataclasses.replace(shape, n_formats=100), 8192, 1, process_bytes=100 * 2**20)
    assert more.total - est.total == 40 * 4095 * 90
