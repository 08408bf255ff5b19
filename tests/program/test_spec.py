"""ProgramSpec: defaults and validation in one place, QEfficient's flags per backend, identity."""

import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.program import DEFAULTS, ProgramSpec


def test_defaults_are_qefficients():
    spec = ProgramSpec()
    assert (spec.ctx_len, spec.prompt_len, spec.batch_size, spec.kv_dtype, spec.backend) == (128, 32, 1, "float32", "ort")
    assert DEFAULTS["ctx_len"] == 128 and spec.qaic_options()["num_cores"] == 16
    assert spec.specializations() == {"specializations": [
        {"batch_size": "1", "seq_len": "32", "ctx_len": "128"}, {"batch_size": "1", "seq_len": "1", "ctx_len": "128"}]}


@pytest.mark.parametrize("options, message", [
    (dict(ctx_len=0), "--ctx-len must be >= 1"),
    (dict(ctx_len=16, prompt_len=32), "--ctx-len (16) is smaller than --prompt-len (32)"),
    (dict(batch_size=True), "--batch-size must be an integer"),
    (dict(kv_dtype="int8"), "--kv-dtype 'int8' is not supported"),
    (dict(weight_bits=3), "--weight-bits must be 4 or 8"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
    (dict(passes=""), "--passes is empty"),
    (dict(passes=("kv-retention", "")), "--passes is empty or has an empty name"),
    (dict(passes=("no-such-pass",)), "unknown pass 'no-such-pass'"),
    (dict(mos=2), "--mos only applies to --backend qaic"),
    (dict(mos=2, aic_enable_depth_first=True), "--mos and --aic-enable-depth-first only apply"),
    (dict(device_group=(0, 1)), "multi-device partitioning needs --backend qaic"),
    (dict(device_group=(0, 0), backend="qaic"), "give distinct device ids"),
    (dict(backend="qaic", weight_bits=4), "--weight-bits applies to --backend ort"),
    (dict(pooling="mean"), "--pooling applies to encoder"),
    (dict(kind="encoder", ctx_len=64), "--ctx-len applies to causal-LM programs"),
    (dict(kind="encoder", seq_lens=()), "--seq-len is empty"),
    (dict(kind="encoder", normalize=True), "--normalize needs a pooling mode"),
    (dict(kind="encoder", pooling="sum"), "unknown pooling 'sum'"),
    (dict(kind="decoder"), "unknown program kind 'decoder'"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(QeffGraphError) as info:
        ProgramSpec(**options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_qefficient_flags_per_backend():
    ort = ProgramSpec(mxfp6=True, mxint8=True, num_cores=10_000)
    assert (ort.weight_bits, ort.kv_dtype) == (8, "float16") and len(ort.notes()) == 2
    assert 1 <= ort.threads() <= 10_000  # capped at the cores available
    assert ort.kv_precision() == "float16"
    # the same artifact whichever way it was asked for: one cache entry
    assert ort.cache_key(model="m") == ProgramSpec(weight_bits=8, kv_dtype="float16").cache_key(model="m")
    assert ort.cache_key(model="m") != ort.cache_key(model="other")
    qaic = ProgramSpec(backend="qaic", mxfp6=True, mxint8=True, num_cores=14)
    assert (qaic.weight_bits, qaic.kv_dtype, qaic.kv_precision()) == (None, "float32", "mxint8")
    assert qaic.qaic_options()["num_cores"] == 14 and qaic.threads() is None
    assert qaic.cache_key(model="m") != ProgramSpec(backend="qaic", num_cores=14).cache_key(model="m")


def test_graph_options_ignore_shapes_and_backend():
    # the portable graph is shared by qaic and ort_lowering=0; ort's default is lowered (its own graph)
    a = ProgramSpec(ctx_len=64, batch_size=4, ort_lowering=0)
    b = ProgramSpec(ctx_len=256, prompt_len=8, backend="qaic")
    assert a.graph_options() == b.graph_options() and a.artifact_options() != b.artifact_options()
    assert ProgramSpec(kv_dtype="float16", ort_lowering=0).graph_options() != a.graph_options()
    lowered = ProgramSpec(ctx_len=64, batch_size=4)
    assert lowered.ort_lowering == 2 and lowered.graph_options() != a.graph_options()
    assert "ort-valid-attention" in lowered.pipeline() and "ort-valid-attention" not in a.pipeline()
    assert lowered.pipeline().index("ort-gqa") < lowered.pipeline().index("ort-valid-attention")
    valid_only = ProgramSpec(ctx_len=64, batch_size=4, ort_lowering=1)
    assert "ort-gqa" not in valid_only.pipeline() and "ort-valid-attention" in valid_only.pipeline()
    assert len({a.cache_key(m="m"), valid_only.cache_key(m="m"), lowered.cache_key(m="m")}) == 3
    with pytest.raises(QeffGraphError, match="ort_lowering must be 0"):
        ProgramSpec(ort_lowering=3)
    with pytest.raises(QeffGraphError, match="applies to --backend ort"):
        ProgramSpec(backend="qaic", ort_lowering=2)
    assert lowered.pass_options(None)["target"] == "ort" and "target" not in a.pass_options(None)
    # manifests written before the lowering (no field, or null) describe portable programs
    old = {k: v for k, v in lowered.to_dict().items() if k != "ort_lowering"}
    assert ProgramSpec.from_dict(old).ort_lowering == 0
    assert ProgramSpec.from_dict({**old, "ort_lowering": None}).ort_lowering == 0


def test_accuracy_level():
    # MatMulNBits' compute: a graph option of quantized programs; the default (1) keeps the old keys
    base = ProgramSpec(weight_bits=4)
    fast = ProgramSpec(weight_bits=4, accuracy_level=4)
    assert ProgramSpec(weight_bits=4, accuracy_level=1) == base and base.accuracy_level is None
    assert "accuracy_level" not in base.artifact_options() and "accuracy_level" not in base.pass_options(None)
    assert fast.pass_options(None)["accuracy_level"] == 4
    assert fast.graph_options() != base.graph_options() and fast.cache_key(m="m") != base.cache_key(m="m")
    assert ProgramSpec.from_dict(fast.to_dict()) == fast
    with pytest.raises(QeffGraphError, match="add --weight-bits"):
        ProgramSpec(accuracy_level=4)
    with pytest.raises(QeffGraphError, match="--accuracy-level must be one of 0, 1, 2, 3, 4"):
        ProgramSpec(weight_bits=4, accuracy_level=5)
    with pytest.raises(QeffGraphError, match="appl.* to causal-LM"):
        ProgramSpec(kind="encoder", accuracy_level=4)


def test_manifest_round_trip_and_continuous_batching():
    spec = ProgramSpec(full_batch_size=4, passes="past-shape, position-mask", device_group=[0])
    assert spec.passes == ("past-shape", "position-mask") and spec.rows == 4
    again = ProgramSpec.from_dict({**spec.to_dict(), "a_future_option": 1})
    assert again == spec
    assert spec.specializations()["specializations"][0]["batch_size"] == "1"


def test_encoder_specs():
    spec = ProgramSpec(kind="encoder", seq_lens=[128, 32], batch_size=8, pooling="mean", normalize=True)
    assert spec.seq_lens == (32, 128) and spec.pipeline() == ["pooling", "fp16-clamp", "ort-fuse-encoder", "cleanup"]
    assert spec.specializations() == {"specializations": [{"batch_size": "8", "seq_len": "32"},
                                                          {"batch_size": "8", "seq_len": "128"}]}
    assert ProgramSpec(kind="encoder").seq_lens == (128,) and ProgramSpec(kind="encoder").pipeline()[0] == "fp16-clamp"
    assert ProgramSpec(kind="encoder", backend="qaic").qaic_options()["retained_state"] is False
    # ort lowers to ONNX Runtime's fused ops, qaic keeps the portable graph; programs built before the
    # lowering (manifests without the field) get another cache key and graph, so they are rebuilt
    qaic = ProgramSpec(kind="encoder", backend="qaic", pooling="mean")
    assert qaic.pipeline() == ["pooling", "fp16-clamp", "cleanup"] and qaic.ort_lowering is None
    old = {k: v for k, v in spec.to_dict().items() if k != "ort_lowering"}
    assert ProgramSpec.from_dict(old).ort_lowering == 0 and "ort-fuse-encoder" not in ProgramSpec.from_dict(old).pipeline()
    assert ProgramSpec.from_dict(old).cache_key(model="m") != spec.cache_key(model="m")
    assert ProgramSpec.from_dict(old).graph_options() != spec.graph_options()
    assert ProgramSpec.from_dict(spec.to_dict()) == spec
    assert ProgramSpec().artifact_options()["ort_lowering"] == 2 and "ort_lowering" not in qaic.artifact_options()
    # --mxfp6 on ort: the encoder's MatMuls in int8 (another graph, another cache key); on qaic: -mxfp6-matmul
    int8 = ProgramSpec(kind="encoder", mxfp6=True, pooling="mean")
    assert int8.weight_bits == 8 and int8.pipeline() == ["pooling", "fp16-clamp", "ort-fuse-encoder", "matmul-int8",
                                                         "cleanup"]
    assert int8.cache_key(model="m") != ProgramSpec(kind="encoder", pooling="mean").cache_key(model="m")
    assert "int8 weights and activations" in int8.notes()[0]
    assert ProgramSpec(kind="encoder", weight_bits=8).pipeline() == int8.pipeline()[1:]
    on_qaic = ProgramSpec(kind="encoder", mxfp6=True, backend="qaic")
    assert on_qaic.weight_bits is None and "matmul-int8" not in on_qaic.pipeline() and on_qaic.qaic_options()["mxfp6"]
    with pytest.raises(QeffGraphError, match="--weight-bits 4: an encoder program takes 8"):
        ProgramSpec(kind="encoder", weight_bits=4)


def test_speculative_verify_specialization():
    spec = ProgramSpec(ctx_len=256, prompt_len=16, batch_size=2, num_speculative_tokens=4)
    assert spec.specializations()["specializations"] == [
        {"batch_size": "2", "seq_len": "16", "ctx_len": "256"}, {"batch_size": "2", "seq_len": "1", "ctx_len": "256"},
        {"batch_size": "2", "seq_len": "5", "ctx_len": "256"}]
    cb = ProgramSpec(prompt_len=8, full_batch_size=3, num_speculative_tokens=7, backend="qaic")
    prefill, decode, verify = cb.specializations()["specializations"]
    assert prefill["batch_size"] == "1" and verify == {**decode, "seq_len": "8"}  # the slots' batch, not prefill's
    # K+1 == prompt_len without continuous batching: the verify shape is the prefill shape, listed once
    assert len(ProgramSpec(prompt_len=8, num_speculative_tokens=7).specializations()["specializations"]) == 2
    assert spec.pass_options(None)["num_speculative_tokens"] == 4 and "num_speculative_tokens" not in \
        ProgramSpec().pass_options(None)
    assert spec.graph_options() != ProgramSpec(ctx_len=256, prompt_len=16, batch_size=2).graph_options()
    assert ProgramSpec.from_dict(spec.to_dict()) == spec
    # a spec without K keeps the cache key it had before the option existed
    assert "num_speculative_tokens" not in ProgramSpec().artifact_options()
    assert spec.cache_key(model="m") != ProgramSpec(ctx_len=256, prompt_len=16, batch_size=2).cache_key(model="m")


@pytest.mark.parametrize("options, message", [
    (dict(num_speculative_tokens=0), "--num-speculative-tokens must be >= 1, got 0"),
    (dict(num_speculative_tokens=2.5), "--num-speculative-tokens must be an integer"),
    (dict(prompt_len=4, num_speculative_tokens=4), "needs a verify step of 5 tokens, longer than --prompt-len 4"),
    (dict(kind="encoder", num_speculative_tokens=2), "--num-speculative-tokens applies to causal-LM programs"),
])
def test_speculative_bad_options(options, message):
    with pytest.raises(QeffGraphError) as info:
        ProgramSpec(**options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_weight_scheme_tells_old_quantized_programs_apart():
    """Programs quantized before the current weight scheme (manifests without it: scheme 1) are
    neither reused nor shared as graph twins; unquantized programs keep their cache keys."""
    from qeff_graph.program.spec import WEIGHT_SCHEME

    new = ProgramSpec(weight_bits=4)
    assert new.weight_scheme == WEIGHT_SCHEME and ProgramSpec().weight_scheme is None
    old = ProgramSpec.from_dict({k: v for k, v in new.to_dict().items() if k != "weight_scheme"})
    assert old.weight_scheme == 1 and old.graph_options() != new.graph_options()
    assert old.cache_key(model="m") != new.cache_key(model="m")
    assert ProgramSpec.from_dict(new.to_dict()) == new
    assert "weight_scheme" not in ProgramSpec().artifact_options()
