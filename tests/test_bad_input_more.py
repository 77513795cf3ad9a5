"""More wrong input (see docs/reliability.md for the full table): parameters,
prompts, chat messages, GGUF files llama.cpp refuses, and the CLI.

Each case ends in one PyllmKvError subclass whose message names the argument and
the value, raised before llama.cpp sees it where possible: through ctypes
llama.cpp would wrap (n_ctx 2**32+256 -> 256), ignore (temperature NaN),
reinterpret (stop="Paris" -> five stop strings) or crash (n_batch < 0: segfault).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import cli, formats
from pyllm_kv.errors import (
    FormatNotAvailable,
    InvalidModelFile,
    InvalidParameter,
    InvalidPrompt,
    LlamaError,
    PyllmKvError,
    UnknownCacheFormat,
)

PROMPT = "The capital of France is"
OURS = next(f.name for f in formats.FORMATS.values() if f.is_ours)


@pytest.fixture(scope="module")
def model(lib_dir, model_path, require_format):
    require_format(OURS)
    with pyllm_kv.load(model_path, cache_k=OURS, cache_v=OURS, n_ctx=256, n_threads=1) as m:
        yield m


# ---- load() parameters (checked before the model file is even parsed) -----------------


@pytest.mark.parametrize("kw,match", [
    ({"n_ctx": -1}, "n_ctx must be between 0 and"),
    ({"n_ctx": 2**32 + 256}, "n_ctx must be between 0 and"),      # ctypes would make it 256
    ({"n_ctx": 2**40}, "n_ctx must be between 0 and"),
    ({"n_ctx": 512.0}, "n_ctx must be an integer"),
    ({"n_ctx": "512"}, "n_ctx must be an integer"),
    ({"n_ctx": True}, "n_ctx must be an integer"),
    ({"n_batch": 0}, "n_batch must be between 1 and"),
    ({"n_batch": -5}, "n_batch must be between 1 and"),             # segfault inside llama.cpp
    ({"n_threads": 0}, "n_threads must be between 1 and"),
    ({"n_threads": -3}, "n_threads must be between 1 and"),
    ({"n_gpu_layers": -2}, "n_gpu_layers must be between -1 and"),
    ({"n_gpu_layers": 1.5}, "n_gpu_layers must be an integer"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
    ({"flash_attn": "no"}, "flash_attn must be True or False"),     # "no" is truthy
    ({"flash_attn": None}, "flash_attn must be True or False"),
    ({"model": 123}, "model must be the path of a .gguf file"),
    ({"model": b"/tmp/m.gguf"}, "model must be the path of a .gguf file"),
])
def test_load_rejects_bad_parameters(kw, match):
    with pytest.raises(InvalidParameter, match=match):
        pyllm_kv.load(**kw)


def test_n_ctx_larger_than_memory(model_path):
    """The largest addressable context needs terabytes of KV cache: refused by arithmetic,
    not by an OOM kill while llama.cpp clears the buffer."""
    with pytest.raises(InvalidParameter, match=r"needs \d+(\.\d)? GiB for the KV cache alone.*machine's"):
        pyllm_kv.load(model_path, n_ctx=2**31 - 1)


def test_n_ctx_zero_means_the_trained_context(model_path, lib_dir, require_format):
    require_format(OURS)
    info = pyllm_kv.read_model_info(model_path)
    with pyllm_kv.load(model_path, cache_k=OURS, cache_v=OURS, n_ctx=0, n_threads=1) as m:
        assert m.n_ctx == info.n_ctx_train


@pytest.mark.parametrize("name", [None, 4, "", "  ", "kv4/kv4", "fp16"])
def test_cache_format_that_is_not_a_name(model_path, name):
    with pytest.raises(UnknownCacheFormat, match="valid formats"):
        pyllm_kv.load(model_path, cache_k=name)


def test_format_names_are_normalised(model_path):
    assert formats.resolve(" KV4 ").name == "kv4"
    assert pyllm_kv.validate_config(pyllm_kv.read_model_info(model_path), "F16", " Q8_0 ", True)[1].name == "q8_0"


def test_registered_format_missing_from_the_library(model_path, lib_dir, monkeypatch):
    """A format in the registry that this native build lacks (an older build, a format
    still being added): FormatNotAvailable naming it, not llama.cpp's failure."""
    fake = dataclasses.replace(formats.FORMATS["kv4"], name="kvz", ggml_name="kvz_not_built")
    monkeypatch.setitem(formats.FORMATS, "kvz", fake)
    with pytest.raises(FormatNotAvailable, match="'kvz' is not provided by the native library"):
        pyllm_kv.load(model_path, cache_k="kvz", cache_v="f16")


def test_directory_as_model_through_load(tmp_path):
    with pytest.raises(InvalidModelFile, match="is not a file"):
        pyllm_kv.load(tmp_path)


# ---- GGUF files that parse but that llama.cpp refuses -------------------------------


def _tiny_gguf(path, arch, with_tensor):
    """A well-formed GGUF with just enough metadata for read_model_info()."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    if with_tensor:
        w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,with_tensor", [("nosucharch", False), ("llama", False), ("llama", True)],
                         ids=["unknown-architecture", "no-tensors", "missing-tensors-and-vocab"])
def test_gguf_that_llama_cpp_refuses(lib_dir, tmp_path, arch, with_tensor):
    path = _tiny_gguf(tmp_path / "tiny.gguf", arch, with_tensor)
    assert pyllm_kv.read_model_info(path).arch == arch  # our parser accepts it...
    with pytest.raises(LlamaError, match=r"llama.cpp could not load .*tiny.gguf.*verbose=True"):
        pyllm_kv.load(path)  # ...llama.cpp does not, and says so through one error


# ---- sampling parameters ------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"max_tokens": -1}, "max_tokens must be between 0 and"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_p": 1.5}, r"top_p must be >= 0 and <= 1"),
    ({"top_k": -1}, "top_k must be between 0 and"),
    ({"seed": -7}, "seed must be between 0 and"),
    ({"stop": [None]}, "stop must hold non-empty strings"),
    ({"stop": [""]}, "stop must hold non-empty strings"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
])
def test_bad_sampling_parameters(model, kw, match):
    with pytest.raises(InvalidParameter, match=match):
        model.generate(PROMPT, **kw)
    if "stop" not in kw:
        with pytest.raises(InvalidParameter, match=match):
            model.chat([{"role": "user", "content": "Hi"}], **kw)
        with pytest.raises(InvalidParameter, match=match):
            model.resume(**kw)  # checked before the session is looked up
    with pytest.raises(InvalidParameter, match=match):
        model.stream(PROMPT, **kw)


def test_max_tokens_zero_generates_nothing(model):
    # llama-cpp-python reads 0 as "no limit"; we keep the plain meaning.
    assert model.generate(PROMPT, max_tokens=0) == ""
    assert list(model.stream(PROMPT, max_tokens=0)) == []
    assert model.chat([{"role": "user", "content": "Hi"}], max_tokens=0) == ""


def test_stop_string_is_one_sequence(model):
    """A str stop is one sequence. It used to become one stop per character, which cut
    the text at the first of those characters instead."""
    full = model.generate(PROMPT, max_tokens=16)
    # A word whose letters show up earlier in the text than the word itself.
    stop = next((w for w in re.findall(r"[A-Za-z]{3,}", full)
                 if min(full.find(c) for c in w) < full.index(w)), None)
    assert stop, f"no suitable stop word in {full!r}"
    cut = full[:full.index(stop)]
    assert model.generate(PROMPT, max_tokens=16, stop=stop) == cut
    assert model.generate(PROMPT, max_tokens=16, stop=[stop]) == cut


# ---- prompts and messages -------------------------------------------------------------


@pytest.mark.parametrize("prompt,match", [
    (None, "the prompt must be a str, got NoneType"),
    (42, "the prompt must be a str, got int"),
    (["a"], "the prompt must be a str, got list"),
    (b"caf\xe9 au lait", r"bytes that are not valid UTF-8 \(invalid continuation byte at byte 3"),
    (b"\xff\xfe", "bytes that are not valid UTF-8"),
    ("caf\udce9", r"not valid Unicode text: '\\udce9' at position 3"),
])
def test_prompt_that_is_not_text(model, prompt, match):
    for call in (model.generate, model.logits, model.prefill, model.tokenize):
        with pytest.raises(InvalidPrompt, match=match):
            call(prompt)


def test_utf8_bytes_and_odd_text_are_accepted(model):
    assert model.generate(PROMPT.encode(), max_tokens=4) == model.generate(PROMPT, max_tokens=4)
    for odd in ("a\x00b", "\u200b", "😀" * 3, "\ufeffHello", "مرحبا"):
        assert np.isfinite(model.logits(odd)).all()


@pytest.mark.parametrize("messages,match", [
    ("hello", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    ({"role": "user", "content": "x"}, "messages must be a non-empty list"),
    ([{"role": "user"}], r"messages\[0\] needs a str 'content'"),
    ([{"content": "x"}], r"messages\[0\] needs a non-empty str 'role'"),
    ([{"role": "user", "content": None}], r"messages\[0\] needs a str 'content'"),
    ([{"role": "user", "content": "ok"}, "x"], r"messages\[1\] needs a non-empty str 'role'"),
    ([{"role": "user", "content": "\udcff"}], r"messages\[0\]\['content'\] is not valid Unicode"),
])
def test_bad_chat_messages(model, messages, match):
    with pytest.raises(InvalidPrompt, match=match):
        model.chat(messages, max_tokens=2)


# ---- the CLI ---------------------------------------------------------------------------


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--ctx", "-5"], "n_ctx must be between 0 and"),
    (["generate", "x", "--threads", "0"], "n_threads must be between 1 and"),
    (["generate", "x", "--ngl", "-5"], "n_gpu_layers must be between -1 and"),
    (["generate", "x", "--seed", "-1"], "seed must be between 0 and"),
    (["generate", "x", "--cache", ""], "unknown cache format ''"),     # used to mean f16
    (["generate", "x", "--cache-v", ""], "unknown cache format ''"),
    (["generate", "x", "--cache", "q8_0/kv2/f16"], "cannot parse cache spec"),
])
def test_cli_bad_values_exit_2(capsys, argv, needle):
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and err.startswith("pyllm-kv: error: ") and needle in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "x", "--temp", "nan", "--ctx", "256"], "temperature must be a finite number"),
    (["generate", "x", "-n", "-5", "--ctx", "256"], "max_tokens must be between 0 and"),
    (["generate", "", "--ctx", "256"], "the prompt is empty"),
])
def test_cli_bad_values_after_loading_exit_2(capsys, lib_dir, argv, needle):
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and needle in err, err
    assert "Traceback" not in err


def test_cli_directory_as_model(capsys, tmp_path):
    rc, _, err = _cli(capsys, "generate", "x", "--model", str(tmp_path))
    assert rc == 2 and "is not a file" in err


@pytest.mark.parametrize("argv", [["generate", "x", "--ctx", "abc"], ["generate", "x", "-n", "1.5"],
                                  ["generate", "x", "--temp", "warm"], ["nosuchcommand"]])
def test_cli_unparsable_values_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_cli_minus_one_means_no_limit():
    ns = argparse.Namespace(max_tokens=-1, max_tokens_default=64)
    assert cli._max_tokens(ns) is None
    ns.max_tokens = None
    assert cli._max_tokens(ns) == 64


def test_every_new_error_is_a_pyllm_kv_error():
    from pyllm_kv.errors import StateFileError, StateMismatch

    for cls in (InvalidParameter, InvalidPrompt, StateFileError, StateMismatch, LlamaError, FormatNotAvailable):
        assert issubclass(cls, PyllmKvError)
    assert issubclass(StateMismatch, StateFileError)
    assert issubclass(InvalidParameter, ValueError) and issubclass(InvalidPrompt, ValueError)


@pytest.mark.parametrize("mode", ["diagonal", "", 3, True, None])
def test_split_mode_checked_before_llama(mode):
    """load(split_mode=) names the valid modes (issue 19) before llama.cpp sees it."""
    from pyllm_kv import checks
    with pytest.raises(InvalidParameter, match="split_mode must be one of none, layer, row"):
        checks.split_mode(mode)
    assert checks.split_mode("Row") == 2 and checks.split_mode(1) == 1


def test_split_mode_passes_through_load(model_path):
    """On one device every split mode gives the same tokens (the mode only matters
    with several GPUs); a bad main_gpu is refused by name."""
    texts = []
    for mode in ("layer", "row", "none"):
        m = pyllm_kv.load(model_path, cache_k="kv4", cache_v="kv4", n_ctx=128, n_threads=1, split_mode=mode)
        try:
            texts.append(m.generate("The capital of France is", max_tokens=4, temperature=0))
        finally:
            m.close()
    assert texts[0] == texts[1] == texts[2]
    with pytest.raises(InvalidParameter, match="main_gpu"):
        pyllm_kv.load(model_path, n_ctx=128, main_gpu=-1)
