"""Generation on a retained-state program: chunked prefill, greedy decode, stats."""

from qeff_graph.generation.generate import GenerationResult, generate_ids

__all__ = ["GenerationResult", "generate_ids"]
