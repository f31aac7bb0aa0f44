"""Shared fixtures: tiny random models built in memory, and the real default model loaded once."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter. Triton reads this when a kernel module
# is imported, so it must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer GQA config (4 query / 2 KV heads, head dim 16) of a Llama-family architecture."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
    if model_type == "mistral":
        base.setdefault("sliding_window", None)
    if model_type == "qwen3":
        base.setdefault("head_dim", 16)
    return cls(**base)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (loaded once per test session, ~40 s on CPU)."""
    import longattn

    return longattn.load_model()


def save_tiny_checkpoint(path) -> None:
    """A tiny Llama and a word-level tokenizer ("w1".."w255") saved as a local HF checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(path)
    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, 256)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="w2").save_pretrained(path)
