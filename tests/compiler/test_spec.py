"""AttentionSpec validation, its uri, and spec files (the ones in specs/ and malformed ones)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pgen import AttentionSpec, SpecError, load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"
BASE = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)


@pytest.mark.parametrize("fields, names", [
    (dict(num_q_heads=12, num_kv_heads=8), ["num_q_heads=12", "num_kv_heads=8", "multiple"]),
    (dict(num_q_heads=0), ["num_q_heads=0", "1..1024"]),
    (dict(num_kv_heads=-8), ["num_kv_heads=-8"]),
    (dict(head_dim=24), ["head_dim=24", "32..256"]),
    (dict(head_dim=264), ["head_dim=264", "32..256"]),
    (dict(head_dim=100), ["head_dim=100", "multiple of 8"]),
    (dict(block_size=0), ["block_size=0", "1..256"]),
    (dict(block_size=512), ["block_size=512", "1..256"]),
    (dict(block_size=24), ["block_size=24", "power of two"]),
    (dict(dtype="float64"), ["dtype='float64'", "float32, float16, bfloat16"]),
    (dict(dtype="fp16"), ["dtype='fp16'"]),
    (dict(kv_dtype="int4"), ["kv_dtype='int4'", "int8, fp8_e4m3"]),
    (dict(dtype="int8"), ["dtype='int8'", "float32, float16, bfloat16"]),
    (dict(scale=0.0), ["scale=0.0", "positive"]),
    (dict(scale=-1.0), ["scale=-1.0"]),
    (dict(scale=math.inf), ["scale=inf"]),
    (dict(scale="0.1"), ["scale='0.1'"]),
    (dict(scale=True), ["scale=True"]),
    (dict(sliding_window=0), ["sliding_window=0"]),
    (dict(sliding_window=4096.0), ["sliding_window=4096.0", "integer"]),
    (dict(logit_softcap=0.0), ["logit_softcap=0.0", "positive"]),
    (dict(logit_softcap=math.nan), ["logit_softcap=nan"]),
    (dict(logit_softcap=True), ["logit_softcap=True"]),
    (dict(head_dim=True), ["head_dim=True", "integer"]),
    (dict(block_size=True), ["block_size=True", "integer"]),
    (dict(num_kv_heads=8.0), ["num_kv_heads=8.0", "integer"]),
])
def test_invalid_values_name_the_parameter_the_value_and_the_fix(fields, names):
    with pytest.raises(SpecError) as err:
        AttentionSpec(**{**BASE, **fields})
    for name in names:
        assert name in str(err.value)


def test_defaults_and_derived_values():
    spec = AttentionSpec(**BASE)
    assert (spec.block_size, spec.dtype, spec.kv_dtype) == (16, "float16", "float16")
    assert spec.scale == 1 / math.sqrt(128) and spec.group_size == 4
    assert spec.block_bytes == 2 * 8 * 16 * 128 * 2
    assert (spec.pool_rows, spec.pool_shape(3), spec.kv_storage_dtype) == (16, (3, 2, 8, 16, 128), "float16")
    assert AttentionSpec(**BASE, scale=1).scale == 1.0 and isinstance(AttentionSpec(**BASE, scale=1).scale, float)
    with pytest.raises(AttributeError):
        spec.head_dim = 64  # frozen


@pytest.mark.parametrize("kv_dtype, storage", [("int8", "int8"), ("fp8_e4m3", "uint8")])
def test_a_quantized_pool_keeps_one_float32_scale_per_token_row_after_the_block(kv_dtype, storage):
    spec = AttentionSpec(**BASE, kv_dtype=kv_dtype)
    # 16 float32 scales = 64 bytes: one extra row of head_dim 128 bytes per (block, K/V, head)
    assert (spec.kv_quantized, spec.kv_storage_dtype, spec.kv_scale_rows, spec.pool_rows) == (True, storage, 1, 17)
    assert spec.block_bytes == 2 * 8 * 17 * 128 and spec.kv_layout != AttentionSpec(**BASE).kv_layout
    assert AttentionSpec(**{**BASE, "head_dim": 32, "block_size": 128}, kv_dtype=kv_dtype).kv_scale_rows == 16
    assert spec.uri.endswith("_kvi8" if kv_dtype == "int8" else "_kvf8e4m3")


def test_uri_is_readable_and_unique_per_variant():
    variants = [
        AttentionSpec(**BASE),
        AttentionSpec(**BASE, dtype="float32"),
        AttentionSpec(**BASE, dtype="bfloat16"),
        AttentionSpec(**BASE, kv_dtype="float32"),
        AttentionSpec(**BASE, block_size=32),
        AttentionSpec(**BASE, scale=0.125),
        AttentionSpec(**BASE, scale=0.0625),
        AttentionSpec(**BASE, sliding_window=4096),
        AttentionSpec(**BASE, logit_softcap=50.0),
        AttentionSpec(**BASE, logit_softcap=30.5),
        AttentionSpec(**BASE, sliding_window=4096, logit_softcap=50.0),
        AttentionSpec(num_q_heads=32, num_kv_heads=32, head_dim=128),
        AttentionSpec(num_q_heads=32, num_kv_heads=8, head_dim=64),
    ]
    assert variants[0].uri == "q32_kv8_d128_bs16_f16"
    assert variants[8].uri == "q32_kv8_d128_bs16_f16_cap50"
    uris = [s.uri for s in variants]
    assert len(set(uris)) == len(uris), uris
    assert len({s.digest() for s in variants}) == len(variants)
    for uri in uris:  # names folders and symbols
        assert uri.replace("_", "").isalnum(), uri
    # The display name is no part of the variant.
    named = AttentionSpec(**BASE, name="llama")
    assert named == variants[0] and named.uri == variants[0].uri and named.digest() == variants[0].digest()
    assert AttentionSpec(**BASE, scale=1 / math.sqrt(128)).uri == variants[0].uri


def test_to_dict_round_trips():
    spec = AttentionSpec(**BASE, sliding_window=64, logit_softcap=30.0, name="x")
    assert AttentionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("file, shape", [
    ("llama3-8b.toml", dict(num_q_heads=32, num_kv_heads=8, head_dim=128)),
    ("qwen2.5-0.5b.toml", dict(num_q_heads=14, num_kv_heads=2, head_dim=64)),
    ("mistral-7b.toml", dict(num_q_heads=32, num_kv_heads=8, head_dim=128, sliding_window=4096)),
    ("gemma2-9b.toml", dict(num_q_heads=16, num_kv_heads=8, head_dim=256, logit_softcap=50.0)),
    ("phi3-mini.toml", dict(num_q_heads=32, num_kv_heads=32, head_dim=96)),
])
def test_required_model_specs_are_shipped(file, shape):
    spec = load_spec(SPECS / file)
    for key, value in shape.items():
        assert getattr(spec, key) == value, (file, key)
    assert spec.name == file.removesuffix(".toml")


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_spec_loads(path):
    spec = load_spec(path)
    assert spec.uri


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, names", [
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = \n", ["spec.toml", "not valid TOML", "line 3"]),
    ("[attention\nnum_q_heads = 32\n", ["not valid TOML"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 128\nhead_size = 64\n",
     ["spec.toml", "unknown key", "head_size", "valid keys", "head_dim"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\n", ["missing required key", "head_dim"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 128\n\n[model]\nlayers = 32\n",
     ["['model']", "belong under [attention]"]),
    ("dtype = 'float32'\n[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 128\n",
     ["['dtype']", "belong under [attention]"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 130\n", ["head_dim=130", "multiple of 8"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = '128'\n", ["head_dim='128'", "integer"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 128\ndtype = 'half'\n", ["dtype='half'"]),
    ("[attention]\nnum_q_heads = 32\nnum_kv_heads = 8\nhead_dim = 128\nsliding_window = true\n",
     ["sliding_window=True"]),
    ("attention = 5\n", ["spec.toml", "[attention]", "table"]),
    ("", ["missing required key"]),
])
def test_malformed_spec_files_raise_spec_error_naming_the_problem(tmp_path, text, names):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    for name in names:
        assert name in str(err.value)


def test_spec_keys_may_sit_at_top_level(tmp_path):
    spec = load_spec(_write(tmp_path, "num_q_heads = 14\nnum_kv_heads = 2\nhead_dim = 64\ndtype = 'float32'\n"))
    assert spec.uri == "q14_kv2_d64_bs16_f32" and spec.name == "spec"


def test_missing_or_unreadable_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "absent.toml")
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path)  # a folder


@pytest.mark.parametrize("block_size", [1, 2, 4, 16, 32])
@pytest.mark.parametrize("head_dim", [32, 96])
def test_an_int8_pool_stores_codes_at_the_documented_interleaved_offsets(block_size, head_dim):
    # KV_LAYOUT_INT8 (docs/package-format.md): K at (x/4 * BS + t) * 4 + x%4, V at (t/Q * D + x) * Q
    # + t%Q with Q = min(4, BS); NumPy's pack_codes and the kernels' kv_codec.code_offset agree.
    import numpy as np

    from pgen.schedules import kv_codec
    from pgen_runtime import kv_quant
    from pgen_runtime.spec import KV_LAYOUT_INT8

    spec = AttentionSpec(num_q_heads=4, num_kv_heads=2, head_dim=head_dim, block_size=block_size, kv_dtype="int8")
    assert spec.kv_layout == KV_LAYOUT_INT8
    codes = np.random.default_rng(block_size).integers(-127, 128, (block_size, head_dim)).astype(np.int8)
    q = min(4, block_size)
    for kv, offset in ((0, lambda t, x: (x // 4 * block_size + t) * 4 + x % 4),
                       (1, lambda t, x: (t // q * head_dim + x) * q + t % q)):
        stored = kv_quant.pack_codes(spec, codes, kv).reshape(-1)
        for t in range(block_size):
            for x in range(head_dim):
                assert stored[offset(t, x)] == codes[t, x]
                assert kv_codec.code_offset(spec, kv, t, x) == offset(t, x)
        assert (kv_quant.unpack_codes(spec, stored.reshape(block_size, head_dim), kv) == codes).all()
