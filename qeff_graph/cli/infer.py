"""``qeff-graph infer``: export → optimize → run, end to end, reusing what the cache has."""

from __future__ import annotations

import json

from qeff_graph.cli.options import (
    HelpFormatter,
    add,
    add_compression_options,
    add_program_options,
    add_qaic_options,
    add_run_options,
    check_run_outputs,
    read_prompts,
    spec_options,
)

HELP = "export, optimize and run a causal LM on prompts (default model: SmolLM2-135M-Instruct)"


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help=HELP, description=HELP + ". Export and compile are skipped when "
                       "the cache ($QEFF_HOME, $XDG_CACHE_HOME/qeff_cache or ~/.cache/qeff_cache) "
                       "has them and they match their manifests (a damaged entry is rebuilt).",
                       formatter_class=HelpFormatter)
    add(p, "--model-name", "-m", default=None,
        help="hub id, local HF dir or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    add(p, "--local-model-dir", default=None, help="local HF model dir (overrides --model-name)")
    add(p, "--gguf-file", default=None, help="GGUF file name inside the model dir")
    add(p, "--cache-dir", default=None, help="cache root (default: $QEFF_HOME, ...)")
    add(p, "--hf-token", default=None, help="Hugging Face token for gated hub models")
    add(p, "--trust-remote-code", action="store_true",
        help="allow running Python code shipped with the model (custom architectures); off by default")
    add(p, "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="torch ONNX exporter")
    add_program_options(p)
    add(p, "--backend", choices=["ort", "qaic"], default=None,
        help="ort: run here with ONNX Runtime (default); qaic: write (and, with the SDK, run) the "
        "qaic-exec compile, then stop")
    add_compression_options(p)
    add_qaic_options(p, num_cores_help="qaic: -aic-num-cores (default 16); ort: CPU threads, capped at "
                     "the cores available")
    add_run_options(p)
    add(p, "--verify-cache", action="store_true",
        help="hash every cached file against its manifest before reuse (sizes and small files are always checked)")
    p.add_argument("--force", action="store_true", help="rebuild export and program even if cached")
    p.set_defaults(run=run)


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
    if "drafter" in perf:
        rate = perf["acceptance_rate"]
        print(f"speculative: {perf['drafter']}, K={perf['num_speculative_tokens']} | acceptance: "
              f"{'-' if rate is None else f'{100 * rate:.1f}%'} ({perf['draft_tokens_accepted']}/"
              f"{perf['draft_tokens_proposed']} drafted tokens) | {perf['tokens_per_target_step'] or 0:.2f} tokens "
              f"per target step ({perf['verify_steps']} of {perf['target_steps']} steps verified drafts)")


def write_output_json(path: str, data: dict) -> None:
    from qeff_graph.fs import write_atomic

    write_atomic(path, json.dumps(data, indent=2) + "\n")


def run(args) -> int:
    from qeff_graph.models import QEFFAutoModelForCausalLM
    from qeff_graph.models.causal_lm import check_draft_options
    from qeff_graph.program import ProgramSpec

    prompts = read_prompts(args.prompt, args.prompts_txt_file_path)
    check_run_outputs(args)
    spec = ProgramSpec(**spec_options(args))  # every option error before the model is touched
    check_draft_options(args.draft, args.lookup_ngram, spec)
    model = QEFFAutoModelForCausalLM.from_pretrained(
        args.local_model_dir or args.model_name, gguf_file=args.gguf_file, hf_token=args.hf_token,
        cache_dir=args.cache_dir, exporter=args.exporter, force=args.force, verify_cache=args.verify_cache,
        trust_remote_code=args.trust_remote_code)
    model.compile_spec(spec)
    if spec.backend == "qaic":
        stop_after_qaic_compile(model.program)
    out = model.generate(prompts=prompts, generation_len=args.generation_len, stream=args.stream,
                         threads=args.threads, chat_template=args.chat_template,
                         write_io_dir=args.write_io_dir, draft=args.draft, lookup_ngram=args.lookup_ngram)
    print_output(out, ctx_len=spec.ctx_len, stream=args.stream)
    if args.output_json:
        write_output_json(args.output_json, out.to_json())
    return 0


def stop_after_qaic_compile(program) -> None:
    """infer --backend qaic: the program is compiled (or its command written); it cannot run here."""
    from qeff_graph.errors import QeffGraphError

    if not program.manifest["backend"].get("executed"):
        raise QeffGraphError(f"qaic-exec not found (Cloud AI 100 SDK not installed); the compile command "
                             f"is in {program.path / 'compile.sh'}: run it where the SDK is, or use "
                             "--backend ort to run here")
    raise QeffGraphError(f"compiled for Cloud AI 100 in {program.path / 'qpc'}; run it with the SDK's runtime "
                         "(qaic-runner or QEfficient): qeff-graph runs --backend ort programs")
