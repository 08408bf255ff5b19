"""The peers of ``qeff-graph bench`` and the worker processes every bench variant runs in.

Peers (``--variants`` names, beside our program variants; ``peers`` = every peer installed here
that can run the model, the others listed as skipped with the command that installs them):

* ``torch`` — transformers on torch, the model loaded as our exporter loads it (float32, SDPA;
  a GGUF de-quantized), greedy steps of the model's forward with a ``DynamicCache`` and
  ``logits_to_keep=1`` (no ``generate()`` overhead);
* ``ort-plain`` — plain ONNX Runtime on the unmodified export (the one our programs are built
  from) with its dynamic KV cache: past/present tensors are handed from step to step as bound
  OrtValues (IO binding), no numpy copies of the cache;
* ``genai-fp32``, ``genai-int4`` — ONNX Runtime GenAI on models its model builder
  (``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``) builds from a Hugging Face
  folder of the same model (a GGUF source is de-quantized and saved there first): the prompt
  ids through ``append_tokens``, then its own greedy search (``generate_next_token``);
  ``max_length`` = ctx_len (its shared past/present buffer is allocated for it); it ends a row
  at the model's EOS even with ``--prompt-set text``;
* ``llama.cpp`` — llama-cpp-python's ``Llama`` on the same GGUF (its own quantized weights;
  ``n_ctx`` = ctx_len, its default f16 KV cache), ``Llama.generate`` with ``temp=0`` (its greedy
  sampler) after a ``reset()``, so no prompt prefix is reused between rounds.

Every peer gets the same prompt ids, the same thread count and the same stop rule (EOS only
with the code-rewrite prompts) as our variants, and prefills the whole prompt in one call.
The workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it: torch and llama.cpp
use OpenMP, whose spinning threads collapse on a machine shared with other work (measured on
the 2-core CI machine at load 3: torch 3.2 → 9.9 decode tok/s, llama.cpp 10.9 → 18.9 with it;
ONNX Runtime, which has its own thread pool, unchanged).
Peers decode equal-length rows only (``--prompt-set text`` at batch > 1), llama.cpp one row
(batch 1). A peer that is not installed, or cannot run the model, is refused before any work,
in one line naming the fix.

Workers: each (variant, batch size, ctx_len) runs in its own process (``multiprocessing``,
spawn) that loads its model once, warms up, and then runs one measured generation per ``run``
command, so the interleaved rounds of :func:`qeff_graph.bench.run_bench` reuse it and its
memory is its own: ``peak_rss_mb`` is the worker's peak resident memory (loading included;
Linux ``VmHWM``, else ``ru_maxrss``), ``run_rss_mb`` its peak during the measured rounds
(``VmHWM`` after a reset through ``/proc/self/clear_refs`` at the end of the warm-up; None where
the kernel does not allow the reset).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qeff_graph import progress as _progress
from qeff_graph.errors import QeffGraphError

__all__ = ["PEERS", "PEERS_KEYWORD", "Source", "Worker", "peer_versions", "prepare_peer", "select_variants"]

PEERS_KEYWORD = "peers"


@dataclasses.dataclass(frozen=True)
class Peer:
    modules: tuple[str, ...]  # importable modules it needs
    pip: str  # what installs them
    summary: str


PEERS: dict[str, Peer] = {
    "torch": Peer(("torch", "transformers"), "pip install torch transformers",
                  "transformers on torch, DynamicCache"),
    "ort-plain": Peer(("onnxruntime",), "pip install onnxruntime",
                      "plain ONNX Runtime on the unmodified export (dynamic KV, IO binding)"),
    "genai-fp32": Peer(("onnxruntime_genai",), "pip install onnxruntime-genai",
                       "ONNX Runtime GenAI, model builder -p fp32"),
    "genai-int4": Peer(("onnxruntime_genai",), "pip install onnxruntime-genai",
                       "ONNX Runtime GenAI, model builder -p int4"),
    "llama.cpp": Peer(("llama_cpp",), "pip install llama-cpp-python",
                      "llama-cpp-python on the same GGUF"),
}
_DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "onnxruntime": "onnxruntime",
                  "onnxruntime_genai": "onnxruntime-genai", "llama_cpp": "llama-cpp-python"}


@dataclasses.dataclass(frozen=True)
class Source:
    """The model every variant runs: as given (``name``/``gguf_file``) and resolved."""

    name: str  # what QEFFAutoModelForCausalLM.from_pretrained takes
    gguf_file: str | None
    directory: str  # local dir or hub id
    gguf: str | None  # GGUF basename
    is_local: bool

    @classmethod
    def of(cls, model_name: str | None, gguf_file: str | None) -> Source:
        from qeff_graph.export.loader import default_model_path, resolve_source

        if model_name is None:
            directory, gguf_file = default_model_path()
            model_name = str(directory)
        directory, gguf, is_local = resolve_source(model_name, gguf_file)
        return cls(str(model_name), gguf_file, directory, gguf, is_local)

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.directory) / self.gguf if self.gguf and self.is_local else None


def installed(peer: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in PEERS[peer].modules)


def peer_versions(names) -> dict[str, str]:
    """``{distribution: version}`` of what the given peers run on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        for module in PEERS[name].modules if name in PEERS else ():
            dist = _DISTRIBUTIONS[module]
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
    return out


def _genai_architectures() -> set[str]:
    """The ``architectures[0]`` values the installed GenAI model builder dispatches on."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    try:
        return set(re.findall(r'architectures\[0\] == "(\w+)"', path.read_text()))
    except OSError:
        return set()


def _architecture(source: Source) -> str | None:
    """The transformers class name of the model (``LlamaForCausalLM``), None if unknown."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        from qeff_graph.export.loader import quiet

        with quiet(capture_stdout=False, progress_bars=False):
            config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf)
        return (config.architectures or [None])[0] or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    except Exception:  # noqa: BLE001 - unknown: the build says what is wrong
        return None


def _has_tokenizer(source: Source) -> bool:
    if source.gguf is not None or not source.is_local:
        return True  # a GGUF carries its tokenizer; a hub repo is checked by its download
    return any((Path(source.directory) / f).exists() for f in
               ("tokenizer.json", "tokenizer.model", "vocab.json"))


def peer_problem(peer: str, source: Source, batch_sizes, prompt_set: str) -> str | None:
    """Why ``peer`` cannot run this bench (one phrase naming the fix), or None."""
    if not installed(peer):
        return f"not installed: {PEERS[peer].pip}"
    if max(batch_sizes) > 1 and prompt_set != "text":
        return (f"runs rows of equal length only, and the {prompt_set} prompts differ at batch > 1: use "
                "--prompt-set text or --batch-sizes 1")
    if peer == "llama.cpp":
        if source.gguf_path is None:
            return ("needs a local GGUF file of the model: pass -m FILE.gguf (llama.cpp's convert_hf_to_gguf.py "
                    "makes one)")
        if max(batch_sizes) > 1:
            return "decodes one sequence at a time (llama-cpp-python's Llama): use --batch-sizes 1"
    if peer.startswith("genai-"):
        if not _has_tokenizer(source):
            return (f"the model in {source.directory} has no tokenizer, which the GenAI model builder needs: save "
                    "one into the model folder")
        arch = _architecture(source) if source.is_local else None  # a hub id: the build says
        supported = _genai_architectures()
        if arch is not None and supported and arch not in supported:
            return f"the GenAI model builder has no {arch} models (it builds {', '.join(sorted(supported)[:6])}, ...)"
    return None


def select_variants(variants, our_variants, source: Source, batch_sizes, prompt_set: str
                    ) -> tuple[list[str], list[str]]:
    """``(variants to run, skipped notes)``: ``peers`` expands to the peers that can run here;
    a peer named explicitly that cannot is an error (one line)."""
    known = [*our_variants, *PEERS]
    unknown = [v for v in variants if v not in known and v != PEERS_KEYWORD]
    if unknown:
        raise QeffGraphError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)} or "
                             f"{PEERS_KEYWORD} (every peer installed here)")
    out, skipped = [], []
    for v in variants:
        names = list(PEERS) if v == PEERS_KEYWORD else [v]
        for name in names:
            if name in out:
                continue
            problem = peer_problem(name, source, batch_sizes, prompt_set) if name in PEERS else None
            if problem is None:
                out.append(name)
            elif v == PEERS_KEYWORD:
                skipped.append(f"{name}: {problem}")
            else:
                raise QeffGraphError(f"peer {name}: {problem}")
    if not out:
        raise QeffGraphError("no variant to run: " + "; ".join(skipped))
    return out, skipped


# ---- preparation in the parent (builds are cached; nothing here is measured) ----

def bench_dir(source: Source, cache_dir=None) -> Path:
    """``<cache>/<model-slug>/bench/``: what the peers need built (HF folder, GenAI models)."""
    from qeff_graph import cache

    name = source.gguf.removesuffix(".gguf") if source.gguf else source.directory
    return cache.cache_root(cache_dir) / cache.model_slug(name) / "bench"


def _source_key(source: Source) -> str:
    from qeff_graph import cache

    path = Path(source.directory) / (source.gguf or "")
    stat = {"size": path.stat().st_size, "mtime": int(path.stat().st_mtime)} if source.is_local and path.is_file() else {}
    return cache.options_hash(model=str(path) if source.is_local else source.directory, **stat)


def hf_folder(source: Source, cache_dir=None) -> Path:
    """A Hugging Face folder of the model (config, weights, tokenizer): the source itself when
    it is one, else the de-quantized float32 model saved once into the bench cache."""
    from qeff_graph.fs import AtomicDir

    if source.is_local and source.gguf is None:
        return Path(source.directory)
    target = bench_dir(source, cache_dir) / f"hf-{_source_key(source)}"
    if (target / "config.json").is_file():
        _progress.say(f"bench: reusing {target}")
        return target
    from qeff_graph.export.loader import load_hf_model

    with _progress.task(f"bench: saving {source.gguf or source.directory} as a float32 Hugging Face folder"):
        model, tokenizer = load_hf_model(source.directory, source.gguf)
        model.hf_quantizer = None  # de-quantized on load: plain float32 weights to save
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with AtomicDir(target, label="bench-hf") as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return target


def genai_model(source: Source, precision: str, cache_dir=None) -> Path:
    """The GenAI model (``-p precision -e cpu``) of the model, built once into the bench cache."""
    import onnxruntime_genai

    from qeff_graph.fs import AtomicDir

    key = _source_key(source)
    target = bench_dir(source, cache_dir) / f"genai-{precision}-{onnxruntime_genai.__version__}-{key}"
    if (target / "genai_config.json").is_file():
        _progress.say(f"bench: reusing {target}")
        return target
    hf = hf_folder(source, cache_dir)
    with AtomicDir(target, label="bench-genai") as tmp, \
            _progress.task(f"bench: building the GenAI {precision} model (onnxruntime_genai.models.builder)"):
        work = tmp / ".work"
        log = tmp.parent / f".{target.name}.log"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(work)]
        with open(log, "w") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
            last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["?"]
            raise QeffGraphError(f"the GenAI model builder failed on {hf} (-p {precision}): {last[0][:200]} "
                                 f"(log: {log})")
        log.unlink()
        shutil.rmtree(work, ignore_errors=True)
    return target


def prepare_peer(peer: str, source: Source, model, cache_dir=None) -> dict:
    """What a peer's worker needs (built or located here, in the parent, through the cache)."""
    if peer == "torch":
        return {"directory": source.directory, "gguf": source.gguf}
    if peer == "ort-plain":
        return {"onnx": str(model.onnx_path or model.export())}
    if peer.startswith("genai-"):
        return {"genai_dir": str(genai_model(source, peer.removeprefix("genai-"), cache_dir))}
    if peer == "llama.cpp":
        return {"gguf_path": str(source.gguf_path)}
    raise QeffGraphError(f"unknown peer {peer}")


# ---- runners (built inside the worker) ----

def greedy_loop(first, step, prompts, generation_len: int, eos, *, done=None) -> tuple[list[list[int]], dict]:
    """Greedy decoding timed like :func:`qeff_graph.generation.generate_ids`'s perf:
    ``first(ids [B, L]) -> [B]`` the tokens after the prompts (prefill), ``step(tokens [B]) -> [B]``
    the next ones; a row stops at an ``eos`` id or after ``generation_len`` tokens; ``done()``:
    whether the runtime itself has finished every row."""
    eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    start = time.perf_counter()
    tokens = first(np.asarray(prompts, dtype=np.int64))
    ttft = time.perf_counter() - start
    out = [[int(t)] for t in tokens]
    alive = [int(t) not in eos and generation_len > 1 for t in tokens]
    decode_tokens = 0
    while any(alive) and not (done and done()):
        tokens = step(np.asarray(tokens, dtype=np.int64))
        for r, t in enumerate(tokens):
            if alive[r]:
                out[r].append(int(t))
                decode_tokens += 1
                alive[r] = int(t) not in eos and len(out[r]) < generation_len
    decode_s = time.perf_counter() - start - ttft
    perf = {"prefill_s": round(ttft, 4), "ttft_s": round(ttft, 4), "decode_s": round(decode_s, 4),
            "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s > 0 and decode_tokens else None,
            "prompt_tokens": int(sum(len(p) for p in prompts)), "generated_tokens": sum(len(o) for o in out)}
    return out, perf


def _argmax(forward):
    return lambda ids: forward(ids).argmax(-1)


def _file_mb(*paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


class TorchRunner:
    def __init__(self, o: dict):
        import inspect

        import torch

        from qeff_graph.export.loader import load_hf_model

        torch.set_num_threads(o["threads"])
        self.torch = torch
        self.model, _ = load_hf_model(o["directory"], o["gguf"])
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.weights_mb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e6
        self.kv = "dynamic"

    def run(self, prompts, generation_len, eos):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache()

        def forward(ids):
            out = self.model(input_ids=torch.from_numpy(ids), use_cache=True, **{self.cache_kw: cache}, **self.keep)
            return out.logits[:, -1].float().numpy()

        with torch.inference_mode():
            return greedy_loop(_argmax(forward), _argmax(lambda t: forward(t[:, None])), prompts, generation_len, eos)


class OrtPlainRunner:
    def __init__(self, o: dict):
        from qeff_graph.program.verify import SourceSession

        self.src = SourceSession(o["onnx"], o["threads"])
        onnx = Path(o["onnx"])
        self.weights_mb = _file_mb(*onnx.parent.glob("*.data")) or _file_mb(onnx)
        self.kv = "dynamic"

    def run(self, prompts, generation_len, eos):
        src = self.src
        io = src.session.io_binding()
        rows = len(prompts)
        state = {"past": {name: np.zeros((rows, heads, 0, dim), dtype) for name, _, heads, dim, dtype in src.cache},
                 "start": 0}

        def forward(ids):
            seq = ids.shape[1]
            start = state["start"]
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            io.bind_cpu_input(src.ids_name, np.ascontiguousarray(ids))
            if src.mask_name:
                io.bind_cpu_input(src.mask_name, np.ones((rows, start + seq), np.int64))
            if src.pos_name:
                io.bind_cpu_input(src.pos_name, np.broadcast_to(np.arange(start, start + seq, dtype=np.int64),
                                                                (rows, seq)).copy())
            for name, value in state["past"].items():
                if isinstance(value, np.ndarray):
                    io.bind_cpu_input(name, value)
                else:
                    io.bind_ortvalue_input(name, value)
            for name in src.outputs:
                io.bind_output(name, "cpu")
            src.session.run_with_iobinding(io)
            outs = io.get_outputs()
            state["past"] = {c[0]: value for c, value in zip(src.cache, outs[1:])}
            state["start"] = start + seq
            return outs[0].numpy()[:, -1]

        return greedy_loop(_argmax(forward), _argmax(lambda t: forward(t[:, None])), prompts, generation_len, eos)


class GenAIRunner:
    def __init__(self, o: dict):
        import onnxruntime_genai as og

        self.og = og
        directory = Path(o["genai_dir"])
        config = og.Config(str(directory))
        config.clear_providers()  # the CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": o["threads"]}}}}))
        self.model = og.Model(config)
        self.ctx_len = o["ctx_len"]
        info = json.loads((directory / "genai_config.json").read_text())
        data = [directory / f"{info['model']['decoder']['filename']}", *directory.glob("*.data")]
        self.weights_mb = _file_mb(*data)
        self.kv = "fixed fp32" if info.get("search", {}).get("past_present_share_buffer") else "dynamic"
        eos = info["model"].get("eos_token_id")
        self.eos = set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())

    def run(self, prompts, generation_len, eos):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.ctx_len, do_sample=False, top_k=1, batch_size=len(prompts))
        generator = og.Generator(self.model, params)

        def first(ids):
            generator.append_tokens(ids.astype(np.int32))  # the prefill
            return step(None)

        def step(_):
            generator.generate_next_token()  # greedy in GenAI; then the next token's forward
            return generator.get_next_tokens()

        # GenAI ends a row at the model's EOS whatever the prompt set; so does this loop then
        stop = self.eos if eos is None else self.eos | ({eos} if isinstance(eos, int) else set(eos))
        return greedy_loop(first, step, prompts, generation_len, stop, done=generator.is_done)


class LlamaCppRunner:
    def __init__(self, o: dict):
        from llama_cpp import Llama

        self.llm = Llama(model_path=o["gguf_path"], n_ctx=o["ctx_len"], n_threads=o["threads"],
                         n_threads_batch=o["threads"], n_batch=max(512, max(len(p) for p in o["prompts"])),
                         logits_all=False, verbose=False)
        self.weights_mb = _file_mb(Path(o["gguf_path"]))
        self.kv = "fixed f16"

    def run(self, prompts, generation_len, eos):
        if len(prompts) != 1:
            raise QeffGraphError("llama.cpp decodes one sequence at a time")
        self.llm.reset()  # n_tokens = 0: generate() reuses no prompt prefix from the last round
        tokens = self.llm.generate([int(t) for t in prompts[0]], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        try:  # each next(): eval of the last token (the prompt, first), then its greedy sampler
            return greedy_loop(lambda ids: [next(tokens)], lambda t: [next(tokens)], prompts, generation_len, eos)
        finally:
            tokens.close()


RUNNERS = {"torch": TorchRunner, "ort-plain": OrtPlainRunner, "genai-fp32": GenAIRunner,
           "genai-int4": GenAIRunner, "llama.cpp": LlamaCppRunner}


# ---- worker processes ----

def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux ``VmHWM`` (the high-water mark of its own
    address space), else ``ru_maxrss``. ``ru_maxrss`` alone would not do on Linux: a spawned worker
    is forked from the parent before it execs Python, and ``ru_maxrss`` keeps the parent's RSS
    that the fork inherited."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024 / 1e6
    except (OSError, AttributeError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300] if isinstance(exc, QeffGraphError) \
        else f"{type(exc).__name__}: {(text[0] if text else '')[:300]}"


def _make_runner(variant: str, options: dict):
    if variant in RUNNERS:
        return RUNNERS[variant](options)
    from qeff_graph.bench import OurRunner

    return OurRunner(variant, options)


def omp_wait_policy() -> str:
    """The ``OMP_WAIT_POLICY`` the workers run with: the caller's, else ``PASSIVE``."""
    return os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"


def serve(conn, variant: str, options: dict) -> None:
    """Worker main: build the runner, warm up, then answer ``"run"`` until ``"stop"``."""
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy()  # before torch / llama.cpp load their OpenMP
    try:
        with _progress.quiet(True):
            runner = _make_runner(variant, options)
            runner.run(options["prompts"], min(4, options["generation_len"]), None)  # warm-up
        load_peak = _peak_rss_mb()
        reset = _reset_hwm()
        conn.send(("ready", {"weights_mb": runner.weights_mb, "kv": runner.kv}))
        while conn.recv() == "run":
            tokens, perf = runner.run(options["prompts"], options["generation_len"], options["eos"])
            peak = _peak_rss_mb()
            conn.send(("done", tokens, perf, {"peak_rss_mb": round(max(peak, load_peak), 1),
                                              "run_rss_mb": round(peak, 1) if reset else None}))
        conn.close()
    except (KeyboardInterrupt, EOFError):
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent in one line
        try:
            conn.send(("error", _one_line(exc)))
        except OSError:
            pass


class Worker:
    """A live worker process for one variant (see the module docstring)."""

    def __init__(self, variant: str, options: dict):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.variant = variant
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, variant, options), daemon=True,
                                name=f"qeff-bench-{variant}")
        self.proc.start()
        child.close()
        self.info = self._receive("ready")[0]

    def run(self) -> tuple[list[list[int]], dict, dict]:
        """One measured generation: ``(tokens, perf, rss)``."""
        self.conn.send("run")
        return self._receive("done")

    def _receive(self, kind: str):
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(10)
            code = self.proc.exitcode
            hint = " (killed: out of memory?)" if code == -9 else ""
            raise QeffGraphError(f"bench: the {self.variant} worker process died, exit code {code}{hint}") from None
        if message[0] == "error":
            self.close()
            raise QeffGraphError(f"bench: {self.variant}: {message[1]}")
        if message[0] != kind:  # pragma: no cover - protocol bug
            raise QeffGraphError(f"bench: the {self.variant} worker answered {message[0]!r}, expected {kind!r}")
        return message[1:]

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self.conn.close()
