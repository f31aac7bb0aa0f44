"""Every supported architecture, as a tiny random config of transformers' own class: at full budget longattn
equals SDPA (prefill, 5 decode steps, a left-padded batch, on transformers' cache and on GrowingCache); a small
budget differs; sliding-window layers run exactly as the model defines them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import longattn
from longattn.hf import SUPPORTED_MODEL_TYPES, check_model

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "mistral-sliding": {"model_type": "mistral", "sliding_window": 24},
    "qwen2": {},
    "qwen3": {},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "gemma": {},
    "gemma2": {"attn_logit_softcapping": None, "sliding_window": 24, "query_pre_attn_scalar": 20,
               "num_hidden_layers": 4, "layer_types": HYBRID},
    "gemma3_text": {"sliding_window": 24, "query_pre_attn_scalar": 20, "num_hidden_layers": 4, "layer_types": HYBRID,
                    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "phi3": {"sliding_window": None},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.2, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "starcoder2": {"sliding_window": None, "hidden_act": "gelu_pytorch_tanh"},
}


def make(name: str, seed: int = 0):
    kw = {**BASE, "num_hidden_layers": 2, **CONFIGS[name]}
    model_type = kw.pop("model_type", name)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    # The reference is the model's own attention: SDPA, or eager where transformers has no SDPA path (Gemma 2).
    impl = "eager" if model_type == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def run(model, ids, mask, cache, steps=5):
    """Prefill, then ``steps`` greedy steps: ``[steps + 1, B, V]`` last-position logits."""
    logits = []
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


def inputs(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 60), generator=g)
    mask = torch.ones(2, 60, dtype=torch.long)
    if padded:
        mask[1, :11] = 0
        ids[1, :11] = 0
    return ids, mask


def test_every_listed_architecture_is_tested():
    assert set(SUPPORTED_MODEL_TYPES) <= {CONFIGS[n].get("model_type", n) for n in CONFIGS}


@pytest.mark.parametrize("cache", ["dynamic", "growing"])
@pytest.mark.parametrize("padded", [False, True], ids=["batch", "left-padded"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_budget_equals_sdpa(name, padded, cache):
    model = make(name)
    check_model(model)
    ids, mask = inputs(padded)

    def new_cache():
        return DynamicCache(config=model.config) if cache == "dynamic" else longattn.GrowingCache()

    ref = run(model, ids, mask, new_cache())
    full = longattn.get_method("moba", block_size=8, top_k=64, window=8, sink_tokens=0)
    with longattn.apply(model, full) as session:
        got = run(model, ids, mask, new_cache())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    full_layers = sum(t == "full_attention" for t in getattr(model.config, "layer_types", None) or ["full_attention"] * 2)
    if name == "mistral-sliding":
        full_layers = 0  # mistral marks its layers sliding through sliding_window alone
    assert session.prefill_stats.calls == full_layers  # the method ran on the full-attention layers only
    small = longattn.get_method("moba", block_size=8, top_k=1, window=8, sink_tokens=4)
    with longattn.apply(model, small) as session:
        sparse = run(model, ids, mask, new_cache())
    if name != "mistral-sliding":  # every layer is sliding there: nothing for the method to select
        assert (sparse - ref).abs().max() > 1e-3, "a small budget must differ from dense"
        assert session.prefill_stats.density < 0.9


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_aware_cache_equals_the_full_cache(name):
    """duo on a HeadAwareCache (streaming KV heads keep sinks + window) gives the logits of duo on the model's
    own cache, on every architecture, hybrid ones included (their sliding layers keep transformers' layer)."""
    from longattn.hf import HeadAwareCache, HeadAwareLayer

    model = make(name)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 256, (2, 90), generator=g)
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, :7] = 0
    layers = model.config.num_hidden_layers
    duo = longattn.get_method("duo", block_size=8, window=8, sink_tokens=4,
                              retrieval_heads=tuple((layer, layer % 2) for layer in range(layers)))
    with longattn.apply(model, duo, kv_cache="full"):
        ref = run(model, ids, mask, DynamicCache(config=model.config), steps=12)
    with longattn.apply(model, duo):
        cache = HeadAwareCache.for_method(duo, model.config, slack=0)  # drop as soon as a block leaves the window
        got = run(model, ids, mask, cache, steps=12)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    kinds = [type(layer).__name__ for layer in cache.layers]
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * layers
    if name == "mistral-sliding":
        types = ["sliding_attention"] * layers
    assert [k == "HeadAwareLayer" for k in kinds] == [t == "full_attention" for t in types]
    assert all(layer._gap > 0 for layer in cache.layers if isinstance(layer, HeadAwareLayer))


def test_sliding_layers_run_at_their_window():
    # The hybrid model's sliding layers see 24 keys; widened to the whole prompt, their outputs change. The
    # method's session runs them exactly (test above); here: they are not run as full attention.
    model = make("gemma3_text")
    ids, mask = inputs(False)
    ref = run(model, ids, mask, longattn.GrowingCache(), steps=0)
    model.config.sliding_window = 4096
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 4096 if layer.self_attn.sliding_window else None
    wide = run(model, ids, mask, longattn.GrowingCache(), steps=0)
    assert (wide - ref).abs().max() > 1e-3


def test_refused_properties_are_named():
    kw = {k: v for k, v in CONFIGS["gemma2"].items() if k != "attn_logit_softcapping"}
    config = AutoConfig.for_model("gemma2", **{**BASE, **kw, "attn_logit_softcapping": 50.0})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="softcapping.*attn_logit_softcapping=50.0"):
        longattn.apply(model, longattn.get_method("moba"))
    model = make("llama")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match=r"layer types \['chunked_attention'\] are not supported"):
        longattn.apply(model, longattn.get_method("moba"))


def test_heads_are_profiled_and_duo_selects_on_the_full_attention_layers_only(default_model):
    from longattn.bench.profiling import profile_heads

    _, tok = default_model
    kw = {**BASE, **CONFIGS["gemma3_text"], "vocab_size": len(tok), "pad_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **kw), attn_implementation="sdpa")
    model = model.eval()
    profile = profile_heads(model, tok, lengths=(200,), depths=(0.5,), seeds=(0,), max_new_tokens=3,
                            sampled_queries=8, window=16)
    full = [i for i, t in enumerate(HYBRID) if t == "full_attention"]
    assert profile.settings["profiled_layers"] == full
    for layer in set(range(4)) - set(full):  # sliding layers: never retrieval, streaming by construction
        assert profile.retrieval[layer] == [0.0] * 4 and profile.streaming[layer] == [1.0] * 4
    chosen = profile.retrieval_heads("kv_head", share=0.5)
    assert set(chosen) <= set(full) and sum(map(len, chosen.values())) == 2  # half of the 2 x 2 full KV heads
    duo = longattn.get_method("duo", profile=profile, retrieval_share=0.5, sink_tokens=4, window=16, block_size=8)
    ids, mask = inputs(True)
    ids = ids % len(tok)
    ref = run(model, ids, mask, longattn.GrowingCache(), steps=2)
    with longattn.apply(model, duo) as session:
        got = run(model, ids, mask, longattn.GrowingCache(), steps=2)
    assert session.prefill_stats.calls == len(full) and session.prefill_stats.density < 1.0
    assert torch.isfinite(got).all() and (got - ref).abs().max() > 1e-4  # streaming heads drop far keys


def test_position_policies_read_the_full_attention_rope_and_refuse_partial_rotary():
    from longattn.core.rope import Rope

    model = make("gemma3_text")
    rope = Rope.from_model(model)
    torch.testing.assert_close(rope.inv_freq, model.model.rotary_emb.full_attention_inv_freq.float())
    assert not torch.allclose(rope.inv_freq, model.model.rotary_emb.sliding_attention_inv_freq.float())
    with longattn.apply(model, longattn.get_method("moba", positions="self_extend", block_size=8, window=16)):
        ids, mask = inputs(False)
        assert torch.isfinite(run(model, ids, mask, longattn.GrowingCache(), steps=1)).all()
    kw = {**BASE, "num_hidden_layers": 2, "partial_rotary_factor": 0.5}
    partial = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi3", **kw), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="partial rotary.*0.5"):
        Rope.from_model(partial)
