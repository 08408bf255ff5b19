"""Running programs: for causal LMs chunked prefill, greedy decode, regular or continuous
batching, speculative decoding with a drafter (prompt lookup or a draft program), and a
streamer that prints each prompt's answer in turn; for encoders the embedding loop (pad to a
seq_len specialization, run in batches)."""

from qeff_graph.generation.embed import EmbeddingResult, embed_ids
from qeff_graph.generation.generate import GenerationResult, generate_ids
from qeff_graph.generation.speculative import Drafter, ProgramDrafter, PromptLookup
from qeff_graph.generation.stream import PromptStreamer

__all__ = ["Drafter", "EmbeddingResult", "GenerationResult", "ProgramDrafter", "PromptLookup", "PromptStreamer",
           "embed_ids", "generate_ids"]
