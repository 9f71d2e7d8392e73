"""Static bit plans: specs, validation, serialization and `--kv` parsing (kvq_jax.plan)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq_jax.config import tiny_config
from kvq_jax.errors import KvqError
from kvq_jax.plan import VALID_BITS, DenseKV, KVPlan, QuantSpec, parse_kv

BITS_MSG = "bits must be one of 1, 1.58, 2, 3, 4, 5, 6, 8, 16"
CFG = tiny_config(head_dim=64, n_layers=3)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# -- QuantSpec --------------------------------------------------------------------------------------


def test_spec_properties():
    s = QuantSpec(3, "channel", 32)
    assert not s.dense and s.storage_bits == pytest.approx(3.2)
    assert s.overhead_bits() == pytest.approx(1.0) and s.overhead_bits("float32") == pytest.approx(2.0)
    assert QuantSpec(1.58).storage_bits == pytest.approx(1.6)
    assert QuantSpec(4).storage_bits == 4 and QuantSpec(5).storage_bits == pytest.approx(32 / 6)
    d = QuantSpec(16)
    assert d.dense and d.storage_bits == 16 and d.overhead_bits() == 0
    assert QuantSpec(4.0) == QuantSpec(4) and hash(QuantSpec(4.0)) == hash(QuantSpec(4))
    assert str(QuantSpec(4.0, "token", 128)) == "4b/token/128"


@pytest.mark.parametrize("bits", VALID_BITS)
@pytest.mark.parametrize("axis, group", [("token", 32), ("token", 128), ("channel", 16), ("channel", 64)])
def test_spec_str_parse_roundtrip(bits, axis, group):
    s = QuantSpec(bits, axis, group)
    assert QuantSpec.parse(str(s)) == s
    assert str(QuantSpec.parse(str(s))) == str(s)


def test_spec_parse_short_forms():
    assert QuantSpec.parse("4") == QuantSpec(4, "token", 64)
    assert QuantSpec.parse("1.58b/channel") == QuantSpec(1.58, "channel", 64)
    assert str(QuantSpec(1.58, "channel", 16)) == "1.58b/channel/16"


@pytest.mark.parametrize(
    "args, msg",
    [
        ((9,), BITS_MSG),
        ((2.5,), BITS_MSG),
        ((True,), BITS_MSG),
        (("4",), BITS_MSG),
        ((4, "head"), "axis must be 'token' or 'channel'"),
        ((4, "token", 16), "token-axis group must be one of 32, 64, 128, got 16"),
        ((4, "channel", 256), "channel-axis group must be one of 16, 32, 64, 128, got 256"),
        ((4, "token", 64.0), "token-axis group must be one of"),
    ],
)
def test_spec_rejects(args, msg):
    with pytest.raises(KvqError) as e:
        QuantSpec(*args)
    assert msg in one_line(e)


@pytest.mark.parametrize("text", ["", "x/token/64", "4b/token/abc", "4/token/64/1", "9b/token/64"])
def test_spec_parse_rejects(text):
    with pytest.raises(KvqError) as e:
        QuantSpec.parse(text)
    one_line(e)


# -- KVPlan -----------------------------------------------------------------------------------------


def mixed_plan() -> KVPlan:
    return KVPlan(
        keys=(QuantSpec(4, "channel", 64), QuantSpec(1.58, "channel", 128), QuantSpec(16, "token", 64)),
        values=(QuantSpec(2, "token", 32), QuantSpec(3, "channel", 32), QuantSpec(8, "token", 64)),
        residual=128,
        sink=2,
        rotate="hadamard",
        scale_dtype="float32",
        model=CFG.name,
        model_layers=3,
        note="hand-made",
    )


def test_uniform_defaults():
    p = KVPlan.uniform(3, 4, 2)
    assert p.n_layers == 3
    assert p.keys == (QuantSpec(4, "channel", 64),) * 3 and p.values == (QuantSpec(2, "token", 64),) * 3
    assert (p.residual, p.sink, p.rotate, p.scale_dtype) == (128, 4, "none", "bfloat16")
    assert p.mean_data_bits() == 3.0
    p.validate(CFG)


def test_block():
    p = mixed_plan()
    assert [p.block(i) for i in range(3)] == [64, 128, 64]
    # Per-token on both sides → 64; dense specs hold no groups and are skipped.
    q = KVPlan((QuantSpec(16, "channel", 128),), (QuantSpec(4, "channel", 32),))
    assert q.block(0) == 32
    assert KVPlan.uniform(1, 4, 4, key_axis="token", group_k=128, group_v=32).block(0) == 64
    assert KVPlan.uniform(1, 4, 4, group_k=16, value_axis="channel", group_v=32).block(0) == 32
    with pytest.raises(KvqError) as e:
        p.block(3)
    assert "layer must be in [0, 3)" in one_line(e)


def test_plan_is_hashable_and_static():
    a, b = KVPlan.uniform(3, 4, 2), KVPlan.uniform(3, 4.0, 2)
    assert a == b and hash(a) == hash(b) and len({a, b, mixed_plan()}) == 2
    # Lists are frozen into tuples, strings parsed into specs.
    c = KVPlan(keys=["4b/channel/64"] * 3, values=[QuantSpec(2, "token", 64)] * 3)
    assert c == a and isinstance(c.keys, tuple)

    f = jax.jit(lambda x, plan: x * plan.block(0), static_argnums=1)
    assert float(f(jnp.float32(2), a)) == 128.0


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_load_roundtrip(tmp_path, suffix):
    for p in (mixed_plan(), KVPlan.uniform(2, 1.58, 16)):
        path = tmp_path / f"plan{suffix}"
        p.save(path)
        text = path.read_text()
        if suffix == ".json":
            assert json.loads(text)["keys"][0] == str(p.keys[0])
        else:
            assert not text.lstrip().startswith("{")
        q = KVPlan.load(path)
        assert q == p and hash(q) == hash(p)
        assert KVPlan.load(str(path)) == p


def test_dict_json_roundtrip():
    p = mixed_plan()
    assert KVPlan.from_dict(p.to_dict()) == p
    assert KVPlan.from_json(p.to_json()) == p
    d = p.to_dict()
    d["keys"] = [{"bits": 4, "axis": "channel", "group": 64}, "1.58b/channel/128", {"bits": 16}]
    assert KVPlan.from_dict(d) == p


spec_st = st.builds(
    QuantSpec,
    bits=st.sampled_from(VALID_BITS),
    axis=st.just("token"),
    group=st.sampled_from([32, 64, 128]),
) | st.builds(QuantSpec, bits=st.sampled_from(VALID_BITS), axis=st.just("channel"),
              group=st.sampled_from([16, 32, 64, 128]))


@settings(max_examples=50, deadline=None)
@given(
    layers=st.lists(st.tuples(spec_st, spec_st), min_size=1, max_size=6),
    residual=st.integers(0, 512),
    sink=st.integers(0, 16),
    rotate=st.sampled_from(["none", "hadamard", "prerope"]),
    scale_dtype=st.sampled_from(["bfloat16", "float32"]),
    model=st.none() | st.text(min_size=1, max_size=12),
    note=st.text(max_size=20),
)
def test_serialization_roundtrip_property(layers, residual, sink, rotate, scale_dtype, model, note):
    p = KVPlan(tuple(k for k, _ in layers), tuple(v for _, v in layers), residual, sink, rotate,
               scale_dtype, model, len(layers) if model else None, note)
    assert KVPlan.from_json(p.to_json()) == p
    assert KVPlan.from_dict(yaml.safe_load(yaml.safe_dump(p.to_dict()))) == p
    assert hash(KVPlan.from_json(p.to_json())) == hash(p)


def test_summaries():
    p = mixed_plan()
    assert p.mean_data_bits() == pytest.approx((4 + 1.58 + 16 + 2 + 3 + 8) / 6)
    storage = [4 + 1.0, 1.6 + 0.5, 16, 2 + 2.0, 3.2 + 2.0, 8 + 1.0]  # packed + fp32 scale/zero
    assert p.mean_storage_bits() == pytest.approx(sum(storage) / 6)
    text = p.describe()
    assert "\n" not in text and "3 layers" in text and "4b/channel/64" in text and "hadamard" in text
    u = KVPlan.uniform(24, 4, 2).describe()
    assert u.startswith("24 layers: K 4b/channel/64; V 2b/token/64; 3.00 data bits")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(keys=(), values=()), "at least one layer"),
        (dict(values=(QuantSpec(4),)), "3 key specs but 1 value specs"),
        (dict(rotate="random"), "rotate must be none, hadamard, prerope or KEYS/VALUES"),
        (dict(scale_dtype="float16"), "scale_dtype must be one of bfloat16, float32"),
        (dict(residual=-1), "residual must be an int >= 0"),
        (dict(sink=1.5), "sink must be an int >= 0"),
        (dict(keys="4b/channel/64"), "must be a list of quant specs"),
        (dict(model_layers=0), "model_layers must be an int >= 1"),
        (dict(window_dtype="float16"), "window_dtype must be one of compute, bfloat16, float32"),
    ],
)
def test_plan_rejects(kwargs, msg):
    base = dict(keys=(QuantSpec(4, "channel"),) * 3, values=(QuantSpec(2),) * 3)
    base.update(kwargs)
    with pytest.raises(KvqError) as e:
        KVPlan(**base)
    assert msg in one_line(e)


# -- validate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan, cfg, msg",
    [
        (KVPlan.uniform(2, 4, 2), CFG, "plan has 2 layers, model 'tiny-llama' has 3"),
        (KVPlan.uniform(3, 4, 2).replace(model="qwen"), CFG,
         "plan was made for model 'qwen', not 'tiny-llama'"),
        (KVPlan.uniform(3, 4, 2).replace(model_layers=30), CFG, "made for a 30-layer model"),
        (KVPlan.uniform(3, 4, 2), tiny_config(n_layers=3, head_dim=16), "head_dim 16 is not divisible by group 64"),
        (KVPlan.uniform(3, 4, 2, value_axis="token", group_v=128), CFG, "layer 0 value spec 2b/token/128"),
        (KVPlan.uniform(3, 4, 2, residual=96), CFG, "residual 96 is not a multiple of layer 0's block 64"),
        (KVPlan.uniform(3, 4, 2, group_k=128, residual=192), CFG, "not a multiple of layer 0's block 128"),
        (KVPlan.uniform(3, 4, 2, residual=0), CFG, "residual 0 is smaller than layer 0's block 64"),
        (KVPlan.uniform(3, 4, 2, rotate="hadamard"), tiny_config(n_layers=3, head_dim=96),
         "rotate='hadamard' needs a power-of-two head_dim, got 96"),
    ],
)
def test_validate_catches(plan, cfg, msg):
    with pytest.raises(KvqError) as e:
        plan.validate(cfg)
    assert msg in one_line(e)


def test_validate_accepts():
    mixed_plan().validate(CFG)
    KVPlan.uniform(3, 16, 16, residual=0).validate(CFG)  # all dense: no recent window needed
    KVPlan.uniform(3, 4, 2, residual=64, rotate="hadamard").validate(CFG)
    KVPlan.uniform(3, 2, 2, key_axis="token", group_k=32, group_v=32, residual=64).validate(
        tiny_config(n_layers=3, head_dim=96)
    )


# -- load errors ------------------------------------------------------------------------------------


def test_load_errors(tmp_path):
    cases = {
        "missing.json": (None, "cannot read plan file"),
        "bad.json": ("{not json", "is not valid JSON"),
        "bad.yaml": ("keys: [a\n  b: :", "is not valid YAML"),
        "list.json": ("[1, 2]", "a plan must be a mapping"),
        "extra.json": (json.dumps({**KVPlan.uniform(1, 4, 2).to_dict(), "bogus": 1}),
                       "unknown plan keys: bogus"),
        "nokeys.yaml": ("values: ['2b/token/64']\n", "plan lacks keys"),
        "badspec.json": (json.dumps({"keys": ["9b/token/64"], "values": ["2"]}), BITS_MSG),
        "plan.txt": ("{}", "must end in .json, .yaml or .yml"),
    }
    for name, (text, msg) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(KvqError) as e:
            KVPlan.load(path)
        assert msg in one_line(e), name
    with pytest.raises(KvqError) as e:
        KVPlan.uniform(1, 4, 2).save(tmp_path / "plan.toml")
    assert "must end in .json, .yaml or .yml" in one_line(e)
    with pytest.raises(KvqError) as e:
        KVPlan.from_json("nope")
    assert "not valid JSON" in one_line(e)


# -- parse_kv ---------------------------------------------------------------------------------------


def test_parse_kv_dense():
    assert parse_kv("fp", 3) == DenseKV("float32")
    assert parse_kv("bf16", 3) == DenseKV("bfloat16")
    assert parse_kv(" FP ", 3) == DenseKV()
    with pytest.raises(KvqError) as e:
        DenseKV("float16")
    assert "dense cache dtype must be one of float32, bfloat16" in one_line(e)


@pytest.mark.parametrize(
    "spec, kb, vb",
    [("K4V2", 4, 2), ("K2V4", 2, 4), ("k1.58v2", 1.58, 2), ("K16V4", 16, 4), ("K8V8", 8, 8),
     ("K1V1.58", 1, 1.58)],
)
def test_parse_kv_uniform(spec, kb, vb):
    p = parse_kv(spec, 3)
    assert p == KVPlan.uniform(3, kb, vb)
    assert p.keys[0] == QuantSpec(kb, "channel", 64) and p.values[0] == QuantSpec(vb, "token", 64)


def test_parse_kv_overrides():
    p = parse_kv("K4V2", 3, key_axis="token", value_axis="channel", group_k=32, group_v=16,
                 residual=256, sink=0, rotate="hadamard")
    assert p.keys == (QuantSpec(4, "token", 32),) * 3 and p.values == (QuantSpec(2, "channel", 16),) * 3
    assert (p.residual, p.sink, p.rotate, p.window_dtype) == (256, 0, "hadamard", "compute")
    b = parse_kv("K4V2", 3, window_dtype="bfloat16")
    assert b.window_dtype == "bfloat16" and b.describe().endswith("window bfloat16")
    assert KVPlan.from_json(b.to_json()) == b
    old = b.to_dict()
    del old["window_dtype"]  # plan files written before the field load as "compute"
    assert KVPlan.from_dict(old).window_dtype == "compute"
    assert parse_kv("fp", 3, residual=64) == DenseKV()  # dense caches take no overrides


def test_parse_kv_plan_file(tmp_path):
    plan = mixed_plan()
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"p{suffix}"
        plan.save(path)
        assert parse_kv(str(path), 3) == plan
        q = parse_kv(str(path), 3, group_v=128, value_axis="token", sink=8)
        assert q.values == tuple(QuantSpec(b, "token", 128) for b in (2, 3, 8))
        assert q.keys == plan.keys and q.sink == 8 and q.residual == plan.residual and q.model == plan.model
        assert parse_kv(str(path), 3, window_dtype="bfloat16").window_dtype == "bfloat16"
    with pytest.raises(KvqError) as e:
        parse_kv(str(tmp_path / "p.json"), 5)
    assert "has 3 layers, the model has 5" in one_line(e)
    with pytest.raises(KvqError) as e:
        parse_kv(str(tmp_path / "p.json"), 3, group_v=16)  # fine for per-channel, not per-token values
    assert f"bad --kv '{tmp_path / 'p.json'}': token-axis group must be one of" in one_line(e)
    (tmp_path / "junk.yaml").write_text("hello")
    with pytest.raises(KvqError) as e:
        parse_kv(str(tmp_path / "junk.yaml"), 3)
    assert "a plan must be a mapping" in one_line(e)
    with pytest.raises(KvqError) as e:
        parse_kv(str(tmp_path), 3)
    assert "is a directory" in one_line(e)


@pytest.mark.parametrize(
    "spec, kw, msg",
    [
        ("K9V2", {}, f"bad --kv 'K9V2': {BITS_MSG}, got '9'"),
        ("K4V2.5", {}, f"bad --kv 'K4V2.5': {BITS_MSG}"),
        ("K0V2", {}, f"bad --kv 'K0V2': {BITS_MSG}"),
        ("K4", {}, "bad --kv 'K4': expected fp, bf16, K<bits>V<bits> (e.g. K4V2) or a plan file"),
        ("int8", {}, "bad --kv 'int8': expected fp, bf16"),
        ("", {}, "bad --kv '': expected"),
        ("nowhere/plan.json", {}, "bad --kv 'nowhere/plan.json': plan file not found"),
        ("plan.yaml", {}, "bad --kv 'plan.yaml': plan file not found"),
        ("K4V2", dict(group_v=16), "bad --kv 'K4V2': token-axis group must be one of 32, 64, 128, got 16"),
        ("K4V2", dict(key_axis="row"), "bad --kv 'K4V2': axis must be 'token' or 'channel'"),
        ("K4V2", dict(rotate="random"), "bad --kv 'K4V2': rotate must be none, hadamard, prerope or KEYS/VALUES"),
        ("K4V2", dict(residual=-64), "bad --kv 'K4V2': residual must be an int >= 0"),
    ],
)
def test_parse_kv_rejects(spec, kw, msg):
    with pytest.raises(KvqError) as e:
        parse_kv(spec, 3, **kw)
    assert msg in one_line(e)


def test_per_layer_rotation():
    specs = (QuantSpec(4, "channel"),) * 3, (QuantSpec(2),) * 3
    p = KVPlan(*specs, rotate=["none", "hadamard", "none"])
    assert p.rotate == ("none", "hadamard", "none") and [p.rotation(i) for i in range(3)] == ["none", "hadamard", "none"]
    pre = KVPlan(*specs, rotate=["prerope", "hadamard", "none"])
    assert KVPlan.from_json(pre.to_json()) == pre and "rotate prerope×1, hadamard×1, none×1" in pre.describe()
    # keys and values each their own rotation: "KEYS/VALUES", in the one-name form where one exists
    kv = KVPlan(*specs, rotate=["prerope/hadamard", "hadamard/hadamard", "prerope/none"])
    assert kv.rotate == ("prerope/hadamard", "hadamard", "prerope")
    assert [(kv.key_rotation(i), kv.value_rotation(i)) for i in range(3)] == [
        ("prerope", "hadamard"), ("hadamard", "hadamard"), ("prerope", "none")]
    assert KVPlan.from_json(kv.to_json()) == kv
    assert KVPlan(*specs, rotate="none/none").rotate == "none"
    for bad in ("hadamard/prerope", "prerope/", "a/b/c"):
        with pytest.raises(KvqError, match="KEYS/VALUES"):
            KVPlan(*specs, rotate=bad)
    assert KVPlan(*specs, rotate=("hadamard",) * 3) == KVPlan(*specs, rotate="hadamard")  # one canonical form
    assert hash(p) == hash(KVPlan(*specs, rotate=("none", "hadamard", "none")))
    assert "rotate none×2, hadamard" in p.describe()
    assert KVPlan.from_json(p.to_json()) == p and json.loads(p.to_json())["rotate"] == ["none", "hadamard", "none"]
    for bad, msg in ((["none"] * 2, "3 layers but 2 rotations"), (["none", "x", "none"], "rotate must be none, hadamard")):
        with pytest.raises(KvqError) as e:
            KVPlan(*specs, rotate=bad)
        assert msg in one_line(e)
    with pytest.raises(KvqError) as e:
        p.validate(tiny_config(n_layers=3, head_dim=48, n_heads=2, n_kv_heads=1, dim=96))
    assert "power-of-two head_dim" in one_line(e)


# ----------------------------------------------------------------------------- codebooks

def test_codebook_spec_validates_and_round_trips(tmp_path):
    s = QuantSpec(2, "channel", 64, levels=[0, 1.1, 1.9, 3])
    assert s.levels == (0.0, 1.1, 1.9, 3.0) and str(s) == "2b/channel/64+codebook"
    assert hash(s) == hash(QuantSpec(2, "channel", 64, levels=(0.0, 1.1, 1.9, 3.0)))
    assert QuantSpec(2, levels=(0, 1, 2, 3)).levels is None  # the uniform levels are no codebook
    plan = KVPlan((s, QuantSpec(4, "channel")), (QuantSpec(2), QuantSpec(2)), rotate="prerope")
    for suffix in (".json", ".yaml"):
        plan.save(tmp_path / f"p{suffix}")
        assert KVPlan.load(tmp_path / f"p{suffix}") == plan
    d = json.loads(plan.to_json())
    assert d["keys"][0] == {"bits": 2, "axis": "channel", "group": 64, "levels": [0.0, 1.1, 1.9, 3.0]}
    assert d["keys"][1] == "4b/channel/64"
    assert "2b/channel/64+codebook×1" in plan.describe()
    assert plan.codebook_bytes() == 16
    # --kv overrides keep a plan file's codebooks
    over = parse_kv(str(tmp_path / "p.json"), 2, residual=64)
    assert over.keys[0].levels == s.levels and over.residual == 64


@pytest.mark.parametrize("bits,levels,msg", [
    (2, (0, 1, 3), "needs 4 increasing levels from 0 to 3"),
    (2, (0, 2, 1, 3), "increasing"),
    (2, (0.5, 1, 2, 3), "from 0 to 3"),
    (2, (0, 1, 2, 3.5), "from 0 to 3"),
    (2, (0, float("nan"), 2, 3), "increasing"),
    (8, tuple(range(256)), "codebooks are supported at"),
    (2, "0123", "levels must be a list of numbers"),
])
def test_codebook_spec_rejects(bits, levels, msg):
    with pytest.raises(KvqError, match=msg):
        QuantSpec(bits, "channel", 64, levels=levels)


def test_codebook_spec_string_needs_its_levels():
    with pytest.raises(KvqError, match="written as a mapping with its levels"):
        QuantSpec.parse("2b/channel/64+codebook")
