"""QEfficient-style model classes over export → optimize → run."""

from qeff_graph.models.causal_lm import QEFFAutoModelForCausalLM
from qeff_graph.models.encoder import QEFFAutoModel

__all__ = ["QEFFAutoModel", "QEFFAutoModelForCausalLM"]
