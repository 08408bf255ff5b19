"""Running programs: for causal LMs chunked prefill, greedy decode, regular or continuous
batching, and a streamer that prints each prompt's answer in turn; for encoders the embedding
loop (pad to a seq_len specialization, run in batches)."""

from qeff_graph.generation.embed import EmbeddingResult, embed_ids
from qeff_graph.generation.generate import GenerationResult, generate_ids
from qeff_graph.generation.stream import PromptStreamer

__all__ = ["EmbeddingResult", "GenerationResult", "PromptStreamer", "embed_ids", "generate_ids"]
