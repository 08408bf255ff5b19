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

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from qeff_graph.errors import QeffGraphError

__all__ = ["qaic_command", "write_mdp_json", "compile_qaic", "find_qaic_exec", "QaicCompileResult",
           "SDK_QAIC_EXEC"]

SDK_QAIC_EXEC = "/opt/qti-aic/exec/qaic-exec"
MANIFEST = "qeff_graph.json"
_PRECISION = {"float32": "float", "float16": "float16"}  # as qeff_graph.program writes them


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
                 hw_version: str = "2.0", executable: str = "qaic-exec") -> list[str]:
    """QEfficient's seed-era ``qaic-exec`` argv for a program directory."""
    if num_cores < 1:
        raise QeffGraphError(f"--num-cores must be >= 1, got {num_cores}")
    if mos is not None and mos < 1:
        raise QeffGraphError(f"--mos must be >= 1, got {mos}")
    p = Path(program_dir)
    cmd = [executable, "-aic-hw", f"-aic-hw-version={hw_version}", f"-m={p / 'model.onnx'}",
           "-compile-only", "-retained-state", "-convert-to-fp16"]
    if mxfp6:
        cmd.append("-mxfp6-matmul")
    if mxint8:
        cmd.append("-mxint8")
    cmd.append(f"-aic-num-cores={num_cores}")
    if mos is not None:
        cmd.append(f"-mos={mos}")
    if aic_enable_depth_first:
        cmd.append("-aic-enable-depth-first")
    cmd += [f"-network-specialization-config={p / 'specializations.json'}",
            f"-custom-IO-list-file={p / 'custom_io.yaml'}"]
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


@dataclasses.dataclass
class QaicCompileResult:
    program_dir: Path
    command: list[str]
    script: Path
    executed: bool
    qaic_exec: str | None  # the executable used, None when the SDK is not installed


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def compile_qaic(program_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 num_cores: int = 16, mxfp6: bool = False, mxint8: bool = False,
                 mos: int | None = None, aic_enable_depth_first: bool = False,
                 device_group: Sequence[int] | None = None, hw_version: str = "2.0",
                 binary_dir: str | os.PathLike | None = None, execute: bool | None = None,
                 stream=None) -> QaicCompileResult:
    """Write ``compile.sh`` (and ``mdp.json``) into the program dir and run it if the SDK is there.

    ``program_dir`` is a program directory (``qeff-graph optimize``); with ``out_dir`` it is
    copied there first. ``binary_dir`` defaults to ``<out_dir>/qpc``. With ``mxint8`` the KV
    IO precisions in ``custom_io.yaml`` become ``mxint8`` (QEfficient's compressed KV).
    ``execute=None`` runs the command when ``qaic-exec`` is found; the manifest records it
    under ``"backend"``.
    """
    src = Path(program_dir)
    if not (src / MANIFEST).exists():
        raise QeffGraphError(f"{src} is not a qeff-graph program directory (no {MANIFEST}); "
                             "run `qeff-graph optimize` first")
    out = Path(out_dir) if out_dir is not None else src
    if out.resolve() != src.resolve():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
    out = out.resolve()
    devices = list(device_group) if device_group else None
    if devices is not None and len(devices) > 1:
        write_mdp_json(out / "mdp.json", devices, num_cores)
    manifest = json.loads((out / MANIFEST).read_text())
    kv_dtype = manifest.get("options", {}).get("kv_dtype", "float32")
    precision = "mxint8" if mxint8 else _PRECISION.get(kv_dtype, "float")
    io_file = out / "custom_io.yaml"
    entries = (yaml.safe_load(io_file.read_text()) or []) if io_file.exists() else None
    if entries is None:
        raise QeffGraphError(f"{out} has no custom_io.yaml; rebuild it with `qeff-graph optimize`")
    if any(e.get("Precision") != precision for e in entries):
        for e in entries:
            e["Precision"] = precision
        _write_text_atomic(io_file, yaml.safe_dump(entries, sort_keys=False))
    binary = Path(binary_dir).resolve() if binary_dir is not None else out / "qpc"
    exe = find_qaic_exec()
    cmd = qaic_command(out, num_cores=num_cores, mxfp6=mxfp6, mxint8=mxint8, mos=mos,
                       aic_enable_depth_first=aic_enable_depth_first, device_group=devices,
                       binary_dir=binary, hw_version=hw_version)
    script = out / "compile.sh"
    _write_text_atomic(script, "#!/bin/sh\n# written by qeff-graph compile --backend qaic\nset -e\n"
                       + shlex.join(cmd) + "\n")
    script.chmod(0o755)
    run = (exe is not None) if execute is None else execute
    if run and exe is None:
        raise QeffGraphError(f"qaic-exec not found (Cloud AI 100 SDK not installed); the command is in {script}")
    manifest["backend"] = {"name": "qaic", "command": cmd, "executed": False,
                           "options": {"num_cores": num_cores, "mxfp6": mxfp6, "mxint8": mxint8,
                                       "mos": mos, "aic_enable_depth_first": aic_enable_depth_first,
                                       "device_group": devices, "hw_version": hw_version},
                           "binary_dir": str(binary)}
    _write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if run:
        argv = [exe, *cmd[1:]]
        try:
            proc = subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise QeffGraphError(f"cannot run {exe} ({exc.strerror}); the command is in {script}") from None
        if proc.returncode != 0:
            raise QeffGraphError(f"qaic-exec failed with exit code {proc.returncode}; "
                                 f"the command is in {script}")
        manifest["backend"]["executed"] = True
        _write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return QaicCompileResult(out, cmd, script, bool(run), exe)
