"""QEfficient-style model classes over export → optimize → run."""

from qeff_graph.models.causal_lm import QEFFAutoModelForCausalLM

__all__ = ["QEFFAutoModelForCausalLM"]
