"""Generation on a retained-state program: chunked prefill, greedy decode, regular or continuous
batching, and a streamer that prints each prompt's answer in turn."""

from qeff_graph.generation.generate import GenerationResult, generate_ids
from qeff_graph.generation.stream import PromptStreamer

__all__ = ["GenerationResult", "PromptStreamer", "generate_ids"]
