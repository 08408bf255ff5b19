"""``qeff-graph infer``: export → optimize → run, end to end, reusing what the cache has."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qeff_graph.cli.options import (
    HelpFormatter,
    add,
    add_compression_options,
    add_program_options,
    add_qaic_options,
    positive_int,
)

HELP = "export, optimize and run a causal LM on prompts (default model: SmolLM2-135M-Instruct)"


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help=HELP, description=HELP + ". Export and compile are skipped when "
                       "the cache ($QEFF_HOME, $XDG_CACHE_HOME/qeff_cache or ~/.cache/qeff_cache) "
                       "has them.", formatter_class=HelpFormatter)
    add(p, "--model-name", "-m", default=None,
        help="hub id, local HF dir or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    add(p, "--local-model-dir", default=None, help="local HF model dir (overrides --model-name)")
    add(p, "--gguf-file", default=None, help="GGUF file name inside the model dir")
    add(p, "--cache-dir", default=None, help="cache root (default: $QEFF_HOME, ...)")
    add(p, "--hf-token", default=None, help="Hugging Face token for gated hub models")
    add(p, "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="torch ONNX exporter")
    add_program_options(p)
    add(p, "--full-batch-size", type=positive_int, default=None,
        help="continuous batching: cache slots refilled from the prompt queue as rows finish")
    add(p, "--generation-len", type=positive_int, default=None,
        help="max new tokens (default: until EOS or ctx_len)")
    group = p.add_mutually_exclusive_group()
    add(group, "--prompt", default=None, help="prompt text; `|` separates several prompts")
    add(group, "--prompts-txt-file-path", default=None, help="file with one prompt per line")
    add(p, "--chat-template", action="store_true",
        help="wrap each prompt as a user turn with the tokenizer's chat template (instruct models)")
    add(p, "--backend", choices=["ort", "qaic"], default="ort",
        help="ort: run here with ONNX Runtime; qaic: write (and, with the SDK, run) the qaic-exec compile")
    add_compression_options(p)
    add_qaic_options(p, num_cores_help="qaic: -aic-num-cores; ort: CPU threads, capped at the cores "
                     "available (default: 16)")
    add(p, "--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads "
        "(overrides --num-cores on ort)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add(p, "--output-json", default=None, help="write prompts, texts, ids and perf stats to this file")
    add(p, "--write-io-dir", default=None, metavar="DIR",
        help="write the first prefill and decode step's inputs/outputs as raw files + aic_batch_io.json")
    p.add_argument("--force", action="store_true", help="rebuild export and program even if cached")
    p.set_defaults(run=run)


def read_prompts(prompt: str | None, path: str | None) -> list[str]:
    from qeff_graph.errors import QeffGraphError

    if path:
        file = Path(path)
        if not file.is_file():
            raise QeffGraphError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    else:
        prompts = [s for s in (prompt or "My name is").split("|")]
    if not prompts or any(not s.strip() for s in prompts):
        raise QeffGraphError("empty prompt; give non-empty text (prompts are separated by `|`)")
    return prompts


def print_output(out, *, ctx_len: int, stream: bool) -> None:
    """Per-prompt text (unless streamed), ctx_len notes and QEfficient-style stats."""
    if not stream:
        for prompt, text in zip(out.prompts, out.generated_texts):
            print(f"=== prompt: {prompt!r}\n{text}")
    for prompt, reason in zip(out.prompts, out.stop_reasons):
        if reason == "ctx_len":
            print(f"note: generation for {prompt!r} stopped at ctx_len={ctx_len}; use a larger --ctx-len for more")
    perf = out.perf
    print(f"TTFT: {perf['ttft_s']:.3f} s | prefill: {perf['prefill_s']:.3f} s | decode: "
          f"{perf['decode_tok_s'] or 0:.1f} tok/s | total: {perf['total_tok_s'] or 0:.1f} tok/s | "
          f"E2E: {perf['e2e_s']:.2f} s")


def run(args) -> int:
    from qeff_graph.models import QEFFAutoModelForCausalLM

    prompts = read_prompts(args.prompt, args.prompts_txt_file_path)
    model = QEFFAutoModelForCausalLM.from_pretrained(
        args.local_model_dir or args.model_name, gguf_file=args.gguf_file, hf_token=args.hf_token,
        cache_dir=args.cache_dir, exporter=args.exporter, force=args.force)
    model.compile(prefill_seq_len=args.prompt_len, ctx_len=args.ctx_len, batch_size=args.batch_size,
                  full_batch_size=args.full_batch_size, num_cores=args.num_cores or 16,
                  mxfp6_matmul=args.mxfp6 or bool(args.weight_bits), mxint8_kv_cache=args.mxint8,
                  backend=args.backend, kv_dtype=args.kv_dtype, device_group=args.device_group,
                  mos=args.mos, aic_enable_depth_first=args.aic_enable_depth_first,
                  aic_hw_version=args.aic_hw_version, weight_bits=args.weight_bits)
    if args.backend == "qaic":
        _stop_after_qaic_compile(model.program_path)
    out = model.generate(prompts=prompts, generation_len=args.generation_len, stream=args.stream,
                         threads=args.threads, chat_template=args.chat_template,
                         write_io_dir=args.write_io_dir)
    print_output(out, ctx_len=args.ctx_len, stream=args.stream)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out.to_json(), indent=2) + "\n")
    return 0


def _stop_after_qaic_compile(program: Path) -> None:
    """infer --backend qaic: the program is compiled (or its command written); it cannot run here."""
    from qeff_graph.errors import QeffGraphError
    from qeff_graph.program import read_manifest

    backend = read_manifest(program).get("backend") or {}
    if not backend.get("executed"):
        raise QeffGraphError(f"qaic-exec not found (Cloud AI 100 SDK not installed); the compile command "
                             f"is in {program / 'compile.sh'}: run it where the SDK is, or use "
                             "--backend ort to run here")
    raise QeffGraphError(f"compiled for Cloud AI 100 in {program / 'qpc'}; run it with the SDK's runtime "
                         "(qaic-runner or QEfficient): qeff-graph runs --backend ort programs")
