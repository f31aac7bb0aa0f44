"""The default model's tokenizer alone (~12 s to read from the GGUF, against ~40 s for the whole model)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the embedded GGUF file without loading the weights."""
    from transformers import AutoTokenizer

    from longattn.hf import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
