"""The flat-KV-cache wrapper traced by the exporters (imports torch; load it lazily)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .loader import KVGeometry, kv_geometry

__all__ = ["FlatCacheCausalLM", "KVGeometry", "kv_geometry", "io_names", "example_inputs", "cache_tensors"]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(num_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


class FlatCacheCausalLM(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *flat_past) -> (logits, *flat_present)``.

    ``flat_past`` is ``k0, v0, k1, v1, …`` with shape ``[batch, kv_heads, past, head_dim]``;
    ``attention_mask`` covers ``past + seq`` positions.
    """

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        n = self.num_layers
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         return_dict=True)
        return (out.logits, *cache_tensors(out.past_key_values))


def cache_tensors(pkv) -> list:
    """``[k0, v0, k1, v1, …]`` of a transformers cache (``Cache`` object or legacy tuples)."""
    flat = []
    if hasattr(pkv, "layers"):
        for layer in pkv.layers:
            flat += [layer.keys, layer.values]
    else:  # older Cache API
        for k, v in (pkv.to_legacy_cache() if hasattr(pkv, "to_legacy_cache") else pkv):
            flat += [k, v]
    return flat


def example_inputs(geo: KVGeometry, batch: int = 2, seq: int = 3, past: int = 4, seed: int = 0):
    """Example inputs (all dims distinct and > 1): ids, all-ones mask, positions past..past+seq-1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, geo.vocab_size, (batch, seq), generator=g, dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq)
    pos = pos.contiguous()
    kv = [torch.randn(batch, geo.num_kv_heads, past, geo.head_dim, generator=g)
          for _ in range(2 * geo.num_layers)]
    return (ids, mask, pos, *kv)
