"""What the exporter reads from a model config: KV geometry (MQA/GQA across families), the
model's longest sequence, and per-layer attention windows whatever the config key."""

from __future__ import annotations

import pytest

from qeff_graph.errors import QeffGraphError
from qeff_graph.export.loader import attention_windows, kv_geometry, max_positions
from tests.helpers import tiny_config

tf = pytest.importorskip("transformers")


@pytest.mark.parametrize("family,kv_heads", [
    ("llama", 2),         # GQA: num_key_value_heads
    ("gpt2", 4),          # MHA
    ("gpt_bigcode", 1),   # multi_query=True
    ("falcon", 4),        # MHA (multi_query=False, num_kv_heads=heads)
    ("falcon_mqa", 1),    # multi_query=True whatever num_kv_heads says
    ("falcon_new", 4),    # new decoder architecture: 2 KV groups broadcast to the 4 heads it caches
    ("mpt", 4),
    ("gemma", 2),
])
def test_kv_geometry_matches_the_cache_the_model_returns(family, kv_heads):
    import torch

    config = tiny_config(family)
    geo = kv_geometry(config)
    assert geo.num_kv_heads == kv_heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    assert {tuple(layer.keys.shape) for layer in cache.layers} == {(1, geo.num_kv_heads, 3, geo.head_dim)}
    assert geo.num_layers == len(cache.layers) and geo.vocab_size == 512
    # the same from config.json (a dict, as model_geometry reads before loading weights)
    assert kv_geometry(config.to_dict()) == geo


def test_kv_geometry_of_config_dicts():
    assert kv_geometry({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                        "num_kv_heads": 8, "multi_query": True, "vocab_size": 10}).num_kv_heads == 1
    assert kv_geometry({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                        "num_kv_heads": 2, "new_decoder_architecture": True, "vocab_size": 10}).num_kv_heads == 8
    assert kv_geometry({"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 10}).num_layers == 3
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_geometry({"hidden_size": 64})


@pytest.mark.parametrize("family,longest", [("gpt2", 512), ("opt", 512), ("mpt", 512), ("codegen", 512),
                                            ("llama", 512), ("bloom", None)])
def test_max_positions(family, longest):
    assert max_positions(tiny_config(family)) == longest
    assert max_positions(tiny_config(family).to_dict()) == longest


def test_attention_windows_across_config_keys():
    # one window for every layer (Mistral, Starcoder2, Phi-3: sliding_window)
    assert attention_windows(tiny_config("mistral")) == [4096, 4096]
    assert attention_windows({"num_hidden_layers": 3, "sliding_window": 8}) == [8, 8, 8]
    assert attention_windows(tiny_config("llama")) == [None, None]
    assert attention_windows(tiny_config("starcoder2")) == [None, None]  # sliding_window=None
    # per-layer kinds (Gemma 2 alternates sliding / full)
    assert attention_windows(tiny_config("gemma2")) == [4, None]
    assert attention_windows({"num_hidden_layers": 2, "sliding_window": 8,
                              "layer_types": ["full_attention", "sliding_attention"]}) == [None, 8]
    # Qwen2: off unless use_sliding_window; then only layers from max_window_layers on
    assert attention_windows(tiny_config("qwen2")) == [None, None]
    assert attention_windows({"num_hidden_layers": 4, "sliding_window": 16, "use_sliding_window": False}) == [None] * 4
    assert attention_windows({"num_hidden_layers": 4, "sliding_window": 16, "use_sliding_window": True,
                              "max_window_layers": 2}) == [None, None, 16, 16]
    q = tf.Qwen2Config(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, use_sliding_window=True,
                       sliding_window=16, max_window_layers=2)
    assert attention_windows(q) == [None, None, 16, 16]
    # GPT-Neo: window_size + attention_types ("global" / "local")
    neo = tf.GPTNeoConfig(num_layers=4, hidden_size=64, num_heads=4, window_size=32,
                          attention_types=[[["global", "local"], 2]])
    assert attention_windows(neo) == [None, 32, None, 32]
    assert attention_windows(neo.to_dict()) == [None, 32, None, 32]
    # attention_window: one int, or one per layer (Longformer style)
    assert attention_windows({"num_hidden_layers": 2, "attention_window": 64}) == [64, 64]
    assert attention_windows({"num_hidden_layers": 3, "attention_window": [64, None, 32]}) == [64, None, 32]
    # Gemma 3 style: every N-th layer is full
    assert attention_windows({"num_hidden_layers": 6, "sliding_window": 4, "sliding_window_pattern": 3}) == \
        [4, 4, None, 4, 4, None]
    # 0 is no window (transformers writes it for Qwen2-MoE without one)
    assert attention_windows(tiny_config("qwen2_moe").to_dict()) == [None, None]
    assert attention_windows({"num_hidden_layers": 2, "sliding_window": 0}) == [None, None]
    # composite configs: the text config
    assert attention_windows({"text_config": {"num_hidden_layers": 2, "sliding_window": 5}}) == [5, 5]


@pytest.mark.parametrize("config,message", [
    ({"num_hidden_layers": 2, "sliding_window": 8, "layer_types": ["chunked_attention", "full_attention"]},
     "attention kind 'chunked_attention'"),
    ({"num_hidden_layers": 2, "sliding_window": -1}, "positive int"),
    ({"num_hidden_layers": 2, "attention_window": [8, 2.5]}, "positive int"),
    ({"num_hidden_layers": 2, "sliding_window": "8"}, "positive int"),
    ({"num_hidden_layers": 2, "attention_window": [8]}, "one per layer"),
    ({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}, "no window size"),
    ({"num_hidden_layers": 3, "sliding_window": 8, "layer_types": ["full_attention"]}, "1 layer types for 3"),
    ({"sliding_window": 8}, "number of layers"),
])
def test_attention_windows_refusals_are_one_line(config, message):
    with pytest.raises(QeffGraphError, match=message) as ei:
        attention_windows(config)
    assert "\n" not in str(ei.value)
