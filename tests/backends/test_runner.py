"""RetainedStateSession's bound buffers: kept bindings, double-buffered caches, logits arrays."""

import numpy as np
import onnx_ir as ir

from qeff_graph.backends.ort import RetainedStateSession
from qeff_graph.backends.ort import runner as runner_module
from qeff_graph.passes import PassManager
from tests.passes.graphs import V, cache_model, to_ir

RETAINED = ["past-shape", "position-mask", "kv-retention", "last-token-logits", "cleanup"]
CTX = 16


def _program(tmp_path):
    path = tmp_path / "p.onnx"
    ir.save(PassManager(RETAINED)(to_ir(cache_model())).model, path)
    return path


def _steps(rows=2):
    rng = np.random.default_rng(4)
    pos = np.array([[0, 1, 2, 3], [0, 1, 2, -1]])
    steps = [(rng.integers(0, V, pos.shape), pos)]
    return steps + [(rng.integers(0, V, (rows, 1)), np.array([[4 + i], [3 + i]])) for i in range(4)]


def test_double_buffered_caches_give_the_numpy_feeds_logits(tmp_path, monkeypatch):
    """A cache not provably updated in place lives in two bound buffers that swap every step: two
    kept bindings, one per direction, and every step's logits equal to numpy feeds'."""
    path = _program(tmp_path)
    reference = RetainedStateSession(path, batch_size=2, ctx_len=CTX, io_binding=False)
    monkeypatch.setattr(runner_module, "inplace_cache_inputs_of", lambda p: (set(), False))
    session = RetainedStateSession(path, batch_size=2, ctx_len=CTX)
    assert session.inplace == set() and session._logits is not None
    for ids, pos in _steps():
        phase = "decode" if pos.shape[1] == 1 else "prefill"
        np.testing.assert_array_equal(session.run(ids, pos, phase=phase), reference.run(ids, pos, phase=phase))
    assert len(session._bindings) == 2  # bound -> spare and spare -> bound, each bound once


def test_each_step_returns_logits_of_its_own(tmp_path):
    """Logits written straight into an array bound for the step: a later step does not touch the
    arrays returned before it (the kept binding is rebound to a new one)."""
    session = RetainedStateSession(_program(tmp_path), batch_size=2, ctx_len=CTX)
    assert session._logits is not None and session.inplace == {"past_key.0", "past_value.0"}
    returned, copies = [], []
    for ids, pos in _steps():
        logits = session.run(ids, pos, phase="decode" if pos.shape[1] == 1 else "prefill")
        returned.append(logits)
        copies.append(logits.copy())
    assert len(session._bindings) == 2  # 5 steps, the two dicts swapping: each direction bound once
    assert len({id(a) for a in returned}) == len(returned)
    for got, want in zip(returned, copies):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(returned[0], a) for a in returned[1:])
