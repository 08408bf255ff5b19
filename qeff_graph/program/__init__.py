"""Programs: :class:`ProgramSpec` (every option that defines one) and :func:`build_program`
(the one atomic way to write one), plus reading and inspecting them."""

from qeff_graph.program.build import (
    MANIFEST,
    Program,
    Source,
    build_program,
    check_output_dir,
    config_sliding_window,
    custom_io,
    is_program_dir,
    optimize,
    read_manifest,
    resolve_source,
)
from qeff_graph.program.inspect import inspect_model
from qeff_graph.program.spec import DEFAULTS, ProgramSpec

__all__ = ["DEFAULTS", "MANIFEST", "Program", "ProgramSpec", "Source", "build_program", "check_output_dir",
           "config_sliding_window", "custom_io", "inspect_model", "is_program_dir", "optimize",
           "read_manifest", "resolve_source"]
