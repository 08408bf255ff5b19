"""Cloud AI 100 (qaic) backend: the seed-era ``qaic-exec`` command line and the configs it reads.

The command is always written (``compile.sh`` in the program dir, and in the manifest); it is
executed only when the Cloud AI 100 SDK is installed.
"""

from __future__ import annotations

from .command import compile_qaic, find_qaic_exec, qaic_command, write_mdp_json

__all__ = ["qaic_command", "write_mdp_json", "compile_qaic", "find_qaic_exec"]
