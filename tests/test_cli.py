"""The pyllm-kv command line: output, exit codes, error messages."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from pyllm_kv import cli, formats

PROMPT = "The capital of France is"


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_formats_table(capsys):
    rc, out, err = run(capsys, "formats")
    assert rc == 0
    for f in formats.FORMATS.values():
        assert f.name in out and f.description in out
    assert "bits/value" in out and "CUDA" in out


def test_info(capsys, model_path):
    rc, out, _ = run(capsys, "info", str(model_path), "--ctx", "4096")
    assert rc == 0
    assert "llama" in out and "head_dim    64" in out
    kv4_line = next(line for line in out.splitlines() if line.startswith("kv4 "))
    from pyllm_kv.model_info import kv_bytes_per_token, read_model_info

    expected = kv_bytes_per_token(read_model_info(model_path), "kv4", "kv4")
    assert f" {expected:.0f} " in kv4_line


def test_info_default_model(capsys, model_path):
    rc, out, _ = run(capsys, "info")
    assert rc == 0 and str(model_path) in out


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--cache", "kv9"], "unknown cache format 'kv9'"),
    (["generate", "x", "--cache-k", "q4_2"], "valid formats"),
    (["generate", "x", "--model", "/nonexistent/model.gguf"], "model file not found"),
    (["generate", "x", "--cache-v", "q4_0", "--no-flash-attn"], "needs flash attention"),
    (["info", "/nonexistent/model.gguf"], "model file not found"),
])
def test_errors_exit_2_without_traceback(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("pyllm-kv: error: ") and needle in err
    assert "Traceback" not in err


def test_text_file_as_model(capsys, tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_text("hello")
    rc, _, err = run(capsys, "info", str(bad))
    assert rc == 2 and "not a GGUF" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate"])  # missing PROMPT
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "x", "--bogus"])
    assert exc.value.code == 2


def test_eval_and_bench_subcommands(capsys):
    for name, (module, _) in cli._PLUGINS.items():
        try:
            __import__(module)
        except ModuleNotFoundError:
            rc, _, err = run(capsys, name, "--anything")
            assert rc == 2 and f"'{name}' command is not available" in err
        else:
            with pytest.raises(SystemExit) as exc:
                cli.main([name, "--help"])
            assert exc.value.code == 0
            assert f"pyllm-kv {name}" in capsys.readouterr().out


# ---- with the model ------------------------------------------------------------------


def test_generate(capsys, lib_dir, model_path):
    rc, out, err = run(capsys, "generate", PROMPT, "--model", str(model_path), "-n", "8",
                       "--ctx", "256", "--cache", "q8_0/q4_0", "--threads", "1")
    assert rc == 0
    assert "Paris" in out
    report = err.strip().splitlines()[-1]
    assert "K=q8_0" in report and "V=q4_0" in report and "B/token" in report


def test_generate_ours(capsys, lib_dir, model_path, require_format):
    require_format("kv4")
    rc, out, err = run(capsys, "generate", PROMPT, "-n", "8", "--ctx", "256", "--cache", "kv4", "--threads", "1")
    assert rc == 0 and "Paris" in out and "K=kv4" in err


def test_chat_session(capsys, monkeypatch, lib_dir, model_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name three colors.\n/reset\nHi!\n/exit\nnever read\n"))
    rc, out, err = run(capsys, "chat", "-n", "16", "--ctx", "512", "--threads", "1")
    assert rc == 0
    assert out.count("> ") == 4  # three inputs answered or handled, then /exit
    assert "/exit" in err  # the hint line


def test_chat_eof_quits(capsys, monkeypatch, lib_dir, model_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, _ = run(capsys, "chat", "-n", "8", "--ctx", "256", "--threads", "1")
    assert rc == 0 and out.strip()


def test_subprocess_is_quiet_and_exits_2(lib_dir, model_path):
    """Real process: llama.cpp's log is silenced; errors have no traceback."""
    env = dict(os.environ, PYLLM_KV_LIB_DIR=str(lib_dir))
    ok = subprocess.run([sys.executable, "-m", "pyllm_kv", "generate", PROMPT, "-n", "4", "--ctx", "256", "--threads", "1"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip().count("\n") == 0, f"unexpected stderr noise:\n{ok.stderr}"
    assert ok.stderr.startswith("KV cache K=f16")
    bad = subprocess.run([sys.executable, "-m", "pyllm_kv", "generate", "x", "--cache", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("pyllm-kv: error: unknown cache format") and "Traceback" not in bad.stderr


def test_subprocess_verbose_shows_llama_log(lib_dir, model_path):
    env = dict(os.environ, PYLLM_KV_LIB_DIR=str(lib_dir))
    res = subprocess.run([sys.executable, "-m", "pyllm_kv", "--verbose", "generate", PROMPT, "-n", "2",
                          "--ctx", "256", "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0
    assert "llama" in res.stderr and res.stderr.count("\n") > 5
