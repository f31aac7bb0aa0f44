"""Hugging Face integration: load the default model, and run any method inside ``model.generate``.

``apply`` registers one attention function, "longattn", through transformers' public ``AttentionInterface``
and a matching mask function through ``AttentionMaskInterface``. The function finds the active session
through an attribute ``apply`` sets on each attention module, so two models (or nested ``apply`` calls)
never share state, and nothing lives in module globals.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from longattn.core.rope import Rope
from longattn.hf.cache import GrowingCache
from longattn.hf.head_aware import HeadAwareCache, HeadAwareLayer, declares_streaming_heads, head_aware_layers
from longattn.hf.loading import (
    DEFAULT_GGUF,
    EMBEDDED_MODELS,
    GEMMA3_270M,
    INSTALL_DEFAULT,
    INSTALL_GEMMA3_270M,
    default_model_path,
    gemma3_270m_path,
    load_model,
)
from longattn.hf.parallel import ShardedCache, ShardedLayer, method_granule, parallel_prefill, shard_bounds
from longattn.hf.session import SESSION_ATTR, Session
from longattn.hf.stats import AttentionStats, Observer
from longattn.methods.base import Method
from longattn.ops.block_sparse import check_backend, resolve_backend

ATTENTION_NAME = "longattn"
# Architectures whose tiny random configs the tests prove equal to SDPA (tests/test_models.py); others that meet
# check_model's mechanism run too.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
    "starcoder2",
)
LAYER_TYPES = ("full_attention", "sliding_attention")
KV_CACHES = ("auto", "head_aware", "full")
"""``apply(kv_cache=...)``: "head_aware" gives the model a :class:`HeadAwareCache` (streaming heads keep sinks +
window), "full" leaves the model's cache alone, "auto" is "head_aware" where the method declares streaming heads
(``Method.streaming_kv_heads``) and "full" elsewhere."""
_SESSION_ATTR = SESSION_ATTR

__all__ = [
    "ATTENTION_NAME", "DEFAULT_GGUF", "EMBEDDED_MODELS", "GEMMA3_270M", "INSTALL_DEFAULT", "INSTALL_GEMMA3_270M",
    "KV_CACHES", "LAYER_TYPES", "SUPPORTED_MODEL_TYPES", "AttentionStats", "GrowingCache", "HeadAwareCache",
    "HeadAwareLayer", "Observer", "Session", "ShardedCache", "ShardedLayer", "apply", "check_model", "default_cache",
    "default_model_path", "gemma3_270m_path", "load_model", "parallel_prefill", "shard_bounds",
]


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
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attention logit softcapping (softcap={kwargs['softcap']}) is not supported by longattn's "
                         "operator; set config.attn_logit_softcapping = None to run without it (changes the outputs)")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(
            f"longattn cannot honour an attention mask of shape {tuple(attention_mask.shape)} and dtype "
            f"{attention_mask.dtype}; pass a 2-D padding mask [batch, length] (custom 4-D masks are not supported)"
        )
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"more queries ({query.shape[2]}) than keys ({key.shape[2]}): the cache is not causal")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    return session.attend(module, query, key, value, attention_mask, scale, window), None


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

    # transformers builds a sliding-window layer's mask with local_size = the window (the attention call then
    # carries sliding_window, which the session runs exactly); any other mask it composes is refused.
    sliding = kwargs.get("local_size") is not None
    if mask_function is not causal_mask_function and not sliding:
        raise ValueError(
            "longattn supports causal attention (full or sliding-window) with padding only; this model or input "
            "asked for another mask (packed sequences, chunked or bidirectional attention, a custom mask function)"
        )
    if int(q_offset) + q_length != kv_offset + kv_length or (kv_offset != 0 and not sliding):
        raise ValueError(
            "longattn needs the queries to be the newest keys of a growing cache (DynamicCache, GrowingCache); got "
            f"q_offset={int(q_offset)}, q_length={q_length}, kv_length={kv_length}, kv_offset={kv_offset} "
            "(static caches are not supported)"
        )
    if attention_mask is None:
        return None
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] not in (kv_length, kv_offset + kv_length):
        raise ValueError(
            f"attention_mask must be [batch={batch_size}, length={kv_length}], got {tuple(attention_mask.shape)}"
        )
    # A sliding cache keeps the newest keys only: their validity is the mask's tail.
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def _attention_modules(model: Any) -> list[Any]:
    return [m.self_attn for m in model.modules() if hasattr(m, "self_attn") and hasattr(m.self_attn, "layer_idx")]


def check_model(model: Any) -> None:
    """Raise a ValueError naming the unsupported property if ``apply`` cannot run ``model`` exactly.

    Support is by mechanism, not by name: a decoder whose attention goes through transformers'
    ``AttentionInterface``, each layer causal full attention or causal sliding-window attention, without
    attention-logit softcapping. ``SUPPORTED_MODEL_TYPES`` lists the architectures the tests prove equal to SDPA.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config: pass a transformers PreTrainedModel")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise ValueError(f"{type(model).__name__} does not dispatch attention through AttentionInterface")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported: longattn runs decoder-only (causal) models")
    layer_types = list(getattr(text, "layer_types", None) or [])
    unsupported = sorted(set(layer_types) - set(LAYER_TYPES))
    if unsupported:
        raise ValueError(f"layer types {unsupported} are not supported; longattn runs {', '.join(LAYER_TYPES)} layers")
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"attention logit softcapping (config.attn_logit_softcapping={softcap}) is not supported by "
                         "longattn's operator; set it to None to run without it (this changes the model's outputs)")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention (config.use_bidirectional_attention) is not supported: longattn "
                         "runs causal attention")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"no attention modules found in {type(model).__name__}: longattn finds a decoder's attention "
                         "as `self_attn` modules with a `layer_idx` (the Llama-family layout of transformers' models)")
    if any(getattr(m, "is_causal", True) is False for m in modules):
        raise ValueError(f"{type(model).__name__} has non-causal attention layers (is_causal=False)")


def _check_parallel(model: Any, method: Method, observer: Observer | None, kv_cache: str) -> None:
    """Refuse what context parallelism does not run, naming it."""
    if observer is not None:
        raise ValueError("process_group cannot be combined with an observer (each rank holds part of the keys)")
    if kv_cache == "head_aware":
        raise ValueError("process_group shards every KV head's cache by position; kv_cache='head_aware' cannot be "
                         "combined with it (use 'auto' or 'full')")
    if method.adjusts_output or getattr(method, "uses_block_means", False):
        raise ValueError(f"method {method.name!r} adjusts outputs from keys of the whole sequence (compensation, "
                         "calibration); it does not run under process_group")
    if method.position_policy().changes_positions:
        raise ValueError(f"method {method.name!r} moves positions (positions={method.positions!r}); it does not run "
                         "under process_group (use positions='original')")
    for i, layer in enumerate(DynamicCache(config=model.config).layers):
        if type(layer) is not DynamicLayer:
            raise ValueError(f"layer {i} is a sliding-window layer; process_group runs models whose layers are all "
                             "full attention")


def default_cache(model: Any) -> Any:
    """The cache a fresh generation on ``model`` should use: the active session's sharded cache under a
    ``process_group``, else a :class:`GrowingCache`."""
    for m in _attention_modules(model):
        session = getattr(m, _SESSION_ATTR, None)
        if session is not None and session.cache_factory is not None and session.parallel:
            return session.new_cache()
        break
    return GrowingCache()


class apply:  # noqa: N801 - used as a context manager, reads like a function: `with longattn.apply(...)`
    """Run ``model`` with ``method`` inside the block; restore its attention implementation on exit.

    Args:
        kv_cache: one of ``KV_CACHES``. With "head_aware" (what "auto" picks when the method declares streaming
            heads: ``duo``, ``razor``, ``streaming``) every forward pass that starts a sequence gets a
            :class:`HeadAwareCache`: one given no cache gets a new one, an empty ``DynamicCache`` (what
            ``generate`` makes) has its layers replaced by head-aware ones. A cache that already holds tokens, or
            any other cache class, is used as given. ``session.new_cache()`` makes one to hold yourself.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``): context
            parallelism. Every rank runs this with the same model and prompt; the KV cache is a
            :class:`~longattn.hf.parallel.ShardedCache` sharded by position over the ranks (``session.new_cache()``,
            or what ``bench.greedy_generate`` makes), prefilled by :func:`~longattn.hf.parallel.parallel_prefill`.
            Refused with an observer, a method that adjusts outputs or moves positions, ``kv_cache="head_aware"``
            and sliding-window layers.

    Example::

        with longattn.apply(model, longattn.get_method("moba", top_k=8)) as session:
            model.generate(**inputs)
        print(session.prefill_stats.density)
    """

    def __init__(self, model: Any, method: Method, backend: str = "auto", observer: Observer | None = None,
                 kv_cache: str = "auto", process_group: Any = None) -> None:
        if not isinstance(method, Method):
            raise ValueError(f"method must be a longattn Method (see longattn.get_method), got {type(method).__name__}")
        check_backend(backend)
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        check_model(model)
        method.check_model(model)  # a per-head method made for another model fails here, before any forward
        self.model = model
        if observer is not None and not callable(observer):
            raise ValueError(f"observer must be callable(layer, q, k, selection, scale, key_mask), got {observer!r}")
        declared = declares_streaming_heads(method, model.config)
        if kv_cache == "head_aware" and not declared:
            raise ValueError(
                f"kv_cache='head_aware' needs a method that declares streaming KV heads (duo or razor without a "
                f"selector, streaming; no position policy); {method.name!r} with these options reads every key"
            )
        self.process_group = process_group
        if process_group is not None:
            _check_parallel(model, method, observer, kv_cache)
        self.head_aware = declared and kv_cache != "full" and process_group is None
        # The model's RoPE is read only when the method's position policy moves keys (and fails clearly on a
        # RoPE variant it cannot re-rotate).
        rope = Rope.from_model(model) if method.position_policy().changes_positions else None
        self.session = Session(method, backend, observer=observer, rope=rope)
        self.session.cache_factory = self.new_cache
        self.session.parallel = process_group is not None
        # A backend that cannot run on the model's device fails here, before any forward pass.
        params = next(iter(model.parameters()), None)
        if params is not None:
            resolve_backend(backend, params.device.type, self.session.moves_single_blocks)
        self._previous: str | None = None
        self._modules: list[Any] = []
        self._hook: Any = None

    def new_cache(self) -> "GrowingCache | HeadAwareCache | ShardedCache":
        """A cache for this model and method: a :class:`~longattn.hf.parallel.ShardedCache` under a
        ``process_group``, a :class:`HeadAwareCache` when the method declares streaming heads (and ``kv_cache`` is
        not "full"), else a :class:`GrowingCache`."""
        if self.process_group is not None:
            return ShardedCache(self.model.config, self.process_group, method_granule(self.session.method))
        if self.head_aware:
            return HeadAwareCache.for_method(self.session.method, self.model.config)
        return GrowingCache()

    def _sharded_only(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook under a process group: every pass must run on the session's sharded cache."""
        if not isinstance(kwargs.get("past_key_values"), ShardedCache):
            raise ValueError("under apply(..., process_group=...) every forward pass runs on a ShardedCache: make one "
                             "with session.new_cache(), prefill it with longattn.parallel_prefill(model, ids, cache) "
                             "(bench.greedy_generate does both), then pass it as past_key_values")
        return None

    def _give_cache(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook: a pass that starts a sequence gets head-aware layers (see ``kv_cache``)."""
        from transformers.cache_utils import Cache, DynamicCache

        cache = kwargs.get("past_key_values")
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(self.model.config, "use_cache", True)
            if not use_cache or any(isinstance(a, Cache) for a in args):  # a cache passed positionally: as is
                return None
            kwargs["past_key_values"] = self.new_cache()
            return args, kwargs
        if type(cache) is DynamicCache and not cache.offloading and cache.get_seq_length() == 0:
            # generate makes an empty DynamicCache before the first pass; its layers become head-aware (the
            # object stays the caller's, so whoever holds it sees the content).
            cache.layers = head_aware_layers(self.session.method, self.model.config)
            cache.layer_class_to_replicate = None
        return None

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
        if self.process_group is not None:
            self._hook = self.model.register_forward_pre_hook(self._sharded_only, with_kwargs=True)
        elif self.head_aware:
            self._hook = self.model.register_forward_pre_hook(self._give_cache, with_kwargs=True)
        return self.session

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.model.set_attn_implementation(self._previous)
        for m in self._modules:
            if hasattr(m, _SESSION_ATTR):
                delattr(m, _SESSION_ATTR)
        if self.session.index is not None:
            self.session.index.reset()
        self.session.reset_memory()
