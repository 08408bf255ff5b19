"""Fixes the exporter applies to a freshly exported graph, each keeping the model's numerics.

- :func:`optimize_keeping_constants` — the dynamo exporter's own optimizer (constant folding,
  onnxscript's default rewrite rules, dead-code and duplicate removal; opset-23 fusions) minus
  its no-op rules: those match ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` with an absolute
  tolerance of 1e-8, so they delete ``+ 1e-8`` (an RMSNorm epsilon) as if it were ``+ 0``.
- :func:`restore_dropped_inputs` — TorchScript drops an input the model never reads (an ALiBi
  model ignores ``position_ids``); it comes back as an unused graph input so every export has
  the same IO.
- :func:`fix_torchscript_bfloat16_casts` — TorchScript numbers a cast to bfloat16 with c10's
  enum value (15), which is COMPLEX128 in ONNX; it becomes a cast to bfloat16 (16).
- :func:`compute_bfloat16_in_float32` — a model that rounds to bfloat16 on purpose (Falcon's
  ALiBi slopes: ``slopes.bfloat16() * arange``) exports bfloat16 arithmetic, which ONNX Runtime
  has no CPU kernel for. Each such node is run in float32 between casts and its result cast
  back to bfloat16: the same numbers torch computes on CPU (it also computes bfloat16 ops in
  float32 and rounds the result), and the graph runs on ORT CPU as exported.
"""

from __future__ import annotations

__all__ = ["optimize_keeping_constants", "restore_dropped_inputs", "compute_bfloat16_in_float32",
           "fix_torchscript_bfloat16_casts"]

# ops that never compute on a bfloat16 value (casts, shape reads)
_BF16_SAFE = frozenset({"Cast", "CastLike", "Shape", "Size", "Constant"})


def optimize_keeping_constants(model) -> None:
    """Optimize an ``onnx_ir`` model in place like ``torch.onnx.export(optimize=True)`` does
    (onnxscript's ``optimize_ir`` then its ONNX fusions), without the no-op rewrite rules that
    drop tiny constants (``x + 1e-8`` → ``x``)."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import onnx_fusions
    from onnxscript.rewriter.rules.common import _no_op

    no_op = set(_no_op.rules)
    rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule not in no_op]
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(
                shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
             rewriter.RewritePass(rules),
             common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)
    onnx_fusions.fuse(model)


def restore_dropped_inputs(model, names: list[str], like: dict[str, str]) -> list[str]:
    """Put back (in ``names`` order) graph inputs the exporter dropped because the model never
    read them, typed like the input named in ``like`` (``{"position_ids": "input_ids"}``).
    ``model`` is an ``onnx.ModelProto``; returns the names restored."""
    import copy

    present = {v.name: v for v in model.graph.input}
    missing = [n for n in names if n not in present]
    restorable = [n for n in missing if like.get(n) in present]
    if not restorable:
        return []
    for name in restorable:
        vi = copy.deepcopy(present[like[name]])
        vi.name = name
        present[name] = vi
    ordered = [present[n] for n in names if n in present]
    others = [v for v in model.graph.input if v.name not in set(names)]
    del model.graph.input[:]
    model.graph.input.extend(ordered + others)
    return restorable


def compute_bfloat16_in_float32(model) -> int:
    """Rewrite every node of an ``onnx.ModelProto`` that computes on bfloat16 values into the
    same node on float32 values: bfloat16 inputs are cast to float32 before it, its bfloat16
    outputs cast back after it. Returns the number of nodes rewritten (graph edited in place;
    weights are not read). Types come from the graph's value_info (ONNX shape inference fills
    it when the exporter did not)."""
    import onnx
    from onnx import TensorProto, helper

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    graph = model.graph
    types = _value_types(graph)
    if not any(t == bf16 for t in types.values()):
        return 0
    # the exporter's value_info may miss values (TorchScript): ONNX shape inference fills them
    inferred = _value_types(onnx.shape_inference.infer_shapes(_without_weights(model)).graph)
    types = {**inferred, **{k: t for k, t in types.items() if t}}
    taken = {o for n in graph.node for o in n.output} | {v.name for v in graph.input} | \
        {i.name for i in graph.initializer}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    out_nodes, rewritten = [], 0
    for node in graph.node:
        ins = [types.get(x) == bf16 for x in node.input if x]
        outs = [types.get(x) == bf16 for x in node.output if x]
        if node.op_type in _BF16_SAFE or node.domain not in ("", "ai.onnx") or not (any(ins) or any(outs)):
            out_nodes.append(node)
            continue
        rewritten += 1
        new_inputs = []
        for x in node.input:
            if x and types.get(x) == bf16:
                y = fresh(f"{x}_as_float32")
                out_nodes.append(helper.make_node("Cast", [x], [y], to=f32, name=fresh(f"{node.name}_in_f32")))
                new_inputs.append(y)
            else:
                new_inputs.append(x)
        new_outputs, casts_back = [], []
        for x in node.output:
            if x and types.get(x) == bf16:
                y = fresh(f"{x}_float32")
                new_outputs.append(y)
                casts_back.append(helper.make_node("Cast", [y], [x], to=bf16, name=fresh(f"{node.name}_out_bf16")))
            else:
                new_outputs.append(x)
        del node.input[:]
        node.input.extend(new_inputs)
        del node.output[:]
        node.output.extend(new_outputs)
        out_nodes.append(node)
        out_nodes.extend(casts_back)
    if rewritten:  # each original output name is now made by its cast back: value_info stays true
        del graph.node[:]
        graph.node.extend(out_nodes)
    return rewritten


def fix_torchscript_bfloat16_casts(model) -> int:
    """TorchScript writes a cast to bfloat16 as ``Cast(to=15)``: 15 is c10's number for
    BFloat16 but ONNX's for COMPLEX128 (ONNX's bfloat16 is 16), so ONNX Runtime refuses the graph
    (``Type 'tensor(complex128)' … is invalid``). A causal LM computes on no complex numbers:
    every such cast of an ``onnx.ModelProto`` becomes the bfloat16 cast it stands for. Returns the
    number of casts fixed."""
    from onnx import TensorProto

    fixed = 0
    for node in model.graph.node:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.COMPLEX128:
                    a.i = TensorProto.BFLOAT16
                    fixed += 1
    if fixed:
        for v in model.graph.value_info:
            if v.type.tensor_type.elem_type == TensorProto.COMPLEX128:
                v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return fixed


def _value_types(graph) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
        elif node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    types[node.output[0]] = a.i
    return types


def _without_weights(model):
    """A copy of the model's graph structure without initializer bytes (for shape inference)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        init.ClearField("raw_data")
        init.ClearField("external_data")
        init.data_location = onnx.TensorProto.DEFAULT
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(field)
    return copy
