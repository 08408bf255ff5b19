"""``qeff-graph inspect``: IO, op histogram, KV layout and weight bytes of an ONNX model."""

from __future__ import annotations

import collections
import json

HELP = "show an ONNX model's IO, op histogram, KV cache layout, attention sites and weight bytes"


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=HELP,
                       description=HELP + " (weights are never read: sizes come from shapes).")
    p.add_argument("model", metavar="MODEL.onnx", help="an .onnx file or a program directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--top", type=int, default=20, help="op types to list")
    p.set_defaults(run=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def run(args) -> int:
    from qeff_graph.program import inspect_model

    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['path']}")
    print(f"opsets: {info['opset_imports']}   producer: {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for v in info["io"][kind]:
            print(f"  {v['name']:<36} {v['dtype'] or '?':<8} {v['shape']}")
    kv = info["kv_cache"]
    if "error" in kv:
        print(f"kv cache: none ({kv['error']})")
    else:
        print(f"kv cache: {kv['layers']} layers, {kv['kv_heads']} kv heads, head_dim "
              f"{kv['head_dim']}, sequence axis {kv['sequence_axis']}, {kv['dtype']}, {kv['form']}")
    att = info["attention"]
    if isinstance(att, dict):
        print(f"attention: not understood ({att['error']})")
    elif att:
        kinds = collections.Counter(a["kind"] for a in att)
        biases = sum(a["bias_terms"] for a in att)
        print(f"attention: {len(att)} sites ({', '.join(f'{n} {k}' for k, n in kinds.items())})"
              + (f", {biases} score biases kept (ALiBi/relative)" if biases else "")
              + (", soft-capped" if any(a["softcap"] for a in att) else ""))
    print(f"weights: {_mib(info['weight_bytes'])} in {info['initializers']} initializers"
          + (f", external data: {', '.join(info['external_data_files'])}" if info["external_data_files"] else ""))
    print(f"nodes: {info['nodes']}")
    for op, count in list(info["ops"].items())[: args.top]:
        print(f"  {op:<28} {count}")
    return 0
