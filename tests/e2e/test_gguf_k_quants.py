"""A K-quant GGUF end to end: transformers loads it, ``export`` → ``optimize --weight-bits 4``
carries every tensor's own blocks (Q4_K, Q5_K, Q6_K — a ``Q4_K_M``-style mix) and the int4
program gives the fp32 program's tokens, the fp32 program transformers'.

gguf writes no K-quants itself, so the file holds random K-quant blocks (small scales) for a
one-layer llama of hidden 256 (K-quant super-blocks are 256 wide)."""

from __future__ import annotations

import numpy as np
import pytest

import qeff_graph as qg
from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.generation import generate_ids
from tests.passes.nbits import random_gguf_rows

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 256, 512, 256, 4, 2
TYPES = {"token_embd": ("Q4_K", VOCAB, HIDDEN), "blk.0.attn_q": ("Q4_K", HIDDEN, HIDDEN),
         "blk.0.attn_k": ("Q4_K", KV_HEADS * 64, HIDDEN), "blk.0.attn_v": ("Q6_K", KV_HEADS * 64, HIDDEN),
         "blk.0.attn_output": ("Q4_K", HIDDEN, HIDDEN), "blk.0.ffn_gate": ("Q4_K", FFN, HIDDEN),
         "blk.0.ffn_up": ("Q5_K", FFN, HIDDEN), "blk.0.ffn_down": ("Q6_K", HIDDEN, FFN),
         "output": ("Q6_K", VOCAB, HIDDEN)}


def _write_llama_gguf(path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(1)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes([i]).decode("latin-1") for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (kind, n, k) in TYPES.items():
        w.add_tensor(f"{name}.weight", random_gguf_rows(rng, kind, n, k), raw_dtype=gguf.GGMLQuantizationType[kind])
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_k_quant_gguf_carried_whole(tmp_path):
    from transformers import AutoModelForCausalLM

    from qeff_graph.export import export_causal_lm

    path = tmp_path / "tiny-k.gguf"
    _write_llama_gguf(path)
    export = export_causal_lm(str(path), tmp_path / "onnx", exporter="torchscript", opset=17, progress=False)
    fp32 = qg.optimize(export.onnx_path, tmp_path / "fp32", ctx_len=64, prompt_len=8, batch_size=2)
    int4 = qg.optimize(export.onnx_path, tmp_path / "int4", ctx_len=64, prompt_len=8, batch_size=2, weight_bits=4)
    stats = next(e["stats"] for e in int4.manifest["pipeline"] if e["pass"] == "matmul-nbits")
    # 8 MatMuls (q, k, v, o, gate, up, down, head) and the embedding: every one the GGUF's own blocks
    assert {k: stats[k] for k in ("quantized", "carried", "requantized", "gathers")} == {
        "quantized": 8, "carried": 9, "requantized": 0, "gathers": 1}
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]  # one prompt over a prefill chunk
    runs = {name: generate_ids(RetainedStateSession(p.path, batch_size=2, ctx_len=64), prompts, prompt_len=8,
                               generation_len=8, return_logits=True) for name, p in (("fp32", fp32), ("int4", int4))}
    assert runs["int4"].generated_ids == runs["fp32"].generated_ids
    for got, want in zip(runs["int4"].logits, runs["fp32"].logits):
        for a, b in zip(got, want):  # the same weights, float accumulation in another order
            assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(b).max())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    for prompt, ids in zip(prompts, runs["fp32"].generated_ids):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
        assert ref[0, len(prompt):].tolist() == ids
