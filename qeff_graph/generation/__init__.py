"""Generation on a retained-state program: chunked prefill, greedy decode, continuous batching."""

from qeff_graph.generation.continuous import generate_continuous
from qeff_graph.generation.generate import GenerationResult, generate_ids

__all__ = ["GenerationResult", "generate_continuous", "generate_ids"]
