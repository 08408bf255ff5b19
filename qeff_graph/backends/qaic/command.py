"""The ``qaic-exec`` command QEfficient (seed era) runs, and a compile step that writes/runs it.

::

    qaic-exec -aic-hw -aic-hw-version=2.0 -m=<program>/model.onnx -compile-only -retained-state
      -convert-to-fp16 [-mxfp6-matmul] [-mxint8] -aic-num-cores=N [-mos=N] [-aic-enable-depth-first]
      -network-specialization-config=<program>/specializations.json
      -custom-IO-list-file=<program>/custom_io.yaml
      [-mdp-load-partition-config=<program>/mdp.json]   # device group of more than one device
      -aic-binary-dir=<binary_dir>
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from qeff_graph.errors import QeffGraphError

__all__ = ["qaic_command", "write_mdp_json", "compile_qaic", "find_qaic_exec", "SDK_QAIC_EXEC"]

SDK_QAIC_EXEC = "/opt/qti-aic/exec/qaic-exec"


def find_qaic_exec() -> str | None:
    """``qaic-exec`` on PATH, else the SDK's default location, else None."""
    found = shutil.which("qaic-exec")
    if found:
        return found
    if os.path.isfile(SDK_QAIC_EXEC) and os.access(SDK_QAIC_EXEC, os.X_OK):
        return SDK_QAIC_EXEC
    return None


def qaic_command(program_dir: str | os.PathLike, *, num_cores: int = 16, mxfp6: bool = False,
                 mxint8: bool = False, mos: int | None = None, aic_enable_depth_first: bool = False,
                 device_group: Sequence[int] | None = None, binary_dir: str | os.PathLike,
                 hw_version: str = "2.0", executable: str = "qaic-exec", retained_state: bool = True) -> list[str]:
    """QEfficient's seed-era ``qaic-exec`` argv for a program directory. ``retained_state=False``
    (an encoder: no KV cache) drops ``-retained-state`` and the custom IO list."""
    if num_cores < 1:
        raise QeffGraphError(f"--num-cores must be >= 1, got {num_cores}")
    if mos is not None and mos < 1:
        raise QeffGraphError(f"--mos must be >= 1, got {mos}")
    p = Path(program_dir)
    cmd = [executable, "-aic-hw", f"-aic-hw-version={hw_version}", f"-m={p / 'model.onnx'}", "-compile-only"]
    cmd += ["-retained-state", "-convert-to-fp16"] if retained_state else ["-convert-to-fp16"]
    if mxfp6:
        cmd.append("-mxfp6-matmul")
    if mxint8:
        cmd.append("-mxint8")
    cmd.append(f"-aic-num-cores={num_cores}")
    if mos is not None:
        cmd.append(f"-mos={mos}")
    if aic_enable_depth_first:
        cmd.append("-aic-enable-depth-first")
    cmd.append(f"-network-specialization-config={p / 'specializations.json'}")
    if retained_state:
        cmd.append(f"-custom-IO-list-file={p / 'custom_io.yaml'}")
    if device_group is not None and len(device_group) > 1:
        cmd.append(f"-mdp-load-partition-config={p / 'mdp.json'}")
    cmd.append(f"-aic-binary-dir={binary_dir}")
    return cmd


def mdp_config(devices: Sequence[int], num_cores: int) -> dict:
    return {"connections": [{"devices": list(devices), "type": "p2p"}],
            "partitions": [{"name": "Partition0",
                            "devices": [{"deviceId": d, "numCores": num_cores} for d in devices]}]}


def write_mdp_json(path: str | os.PathLike, devices: Sequence[int], num_cores: int) -> Path:
    """Multi-device partition config (one partition over ``devices``, p2p connected)."""
    path = Path(path)
    path.write_text(json.dumps(mdp_config(devices, num_cores)) + "\n")
    return path


def compile_qaic(build_dir: str | os.PathLike, final_dir: str | os.PathLike, *, num_cores: int = 16,
                 mxfp6: bool = False, mxint8: bool = False, mos: int | None = None,
                 aic_enable_depth_first: bool = False, device_group: Sequence[int] | None = None,
                 hw_version: str = "2.0", retained_state: bool = True, execute: bool | None = None,
                 stream=None) -> dict:
    """Write ``compile.sh`` (and ``mdp.json``) into a program being built in ``build_dir`` and
    run ``qaic-exec`` there when the SDK is installed; returns the manifest's ``"backend"``.

    ``build_dir`` is the temp folder the program is written in; ``final_dir`` the folder it
    becomes: ``compile.sh`` and the manifest name the final paths, the run uses the temp ones
    (its binaries land in ``<build_dir>/qpc`` and so appear with the rest of the program, or
    not at all). ``execute=None`` runs the command when ``qaic-exec`` is found.
    """
    build, final = Path(build_dir), Path(final_dir)
    devices = list(device_group) if device_group else None
    if devices is not None and len(devices) > 1:
        write_mdp_json(build / "mdp.json", devices, num_cores)
    options = dict(num_cores=num_cores, mxfp6=mxfp6, mxint8=mxint8, mos=mos,
                   aic_enable_depth_first=aic_enable_depth_first, device_group=devices, hw_version=hw_version,
                   retained_state=retained_state)
    cmd = qaic_command(final, binary_dir=final / "qpc", **options)
    script = build / "compile.sh"
    script.write_text("#!/bin/sh\n# written by qeff-graph compile --backend qaic\nset -e\n" + shlex.join(cmd) + "\n")
    script.chmod(0o755)
    exe = find_qaic_exec()
    run = (exe is not None) if execute is None else execute
    if run and exe is None:
        raise QeffGraphError("qaic-exec not found (Cloud AI 100 SDK not installed); compile without "
                             "execute=True to only write the command")
    backend = {"name": "qaic", "command": cmd, "executed": False, "options": options,
               "binary_dir": str(final / "qpc")}
    if run:
        from qeff_graph import progress

        argv = qaic_command(build, binary_dir=build / "qpc", executable=exe, **options)
        try:
            with progress.task("qaic-exec"):
                proc = subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise QeffGraphError(f"cannot run {exe} ({exc.strerror}); check the Cloud AI 100 SDK install") from None
        if proc.returncode != 0:
            raise QeffGraphError(f"qaic-exec failed with exit code {proc.returncode} (its output is above); "
                                 f"nothing was written; the command was: {shlex.join(cmd)}")
        backend.update(executed=True, qaic_exec=exe)
    return backend
