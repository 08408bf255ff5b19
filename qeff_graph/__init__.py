"""qeff-graph: graph-level ONNX rewriting for transformer inference with a retained KV cache.

Export a model unmodified, rewrite its ONNX graph with a pass pipeline, compile and run::

    import qeff_graph as qg
    model = qg.ir.load("model.onnx")
    pm = qg.PassManager([qg.passes.KVRetention(), qg.passes.Cleanup()])
    qg.ir.save(pm(model).model, "out/")
"""

__version__ = "0.1.0"

from qeff_graph import ir, passes  # noqa: E402
from qeff_graph.errors import QeffGraphError  # noqa: E402
from qeff_graph.passes import PassManager  # noqa: E402
from qeff_graph.program import Program, ProgramSpec, build_program, inspect_model, optimize  # noqa: E402

__all__ = ["PassManager", "Program", "ProgramSpec", "QeffGraphError", "__version__", "build_program",
           "inspect_model", "ir", "optimize", "passes"]
