"""HeadAwareCache: streaming KV heads keep only sinks + window, and the logits equal the same method on a full
cache (prefill, decode, chunked prefill, left padding, generate, crop, batch selection, the observer)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import longattn
from longattn.analysis import RecallRecorder
from longattn.hf.cache import GrowingLayer
from longattn.hf.head_aware import HeadAwareCache, HeadAwareLayer
from tests.conftest import tiny_model
from tests.hf.test_cache import _run

GEOMETRY = {"block_size": 8, "window": 16, "sink_tokens": 4}
RETRIEVAL = ((0, 1), (1, 0), (1, 3))  # KV heads of the 4-KV-head model: layer 1 keeps 0 and 3, streams 1 and 2
METHODS = {
    "duo": ("duo", {**GEOMETRY, "retrieval_heads": RETRIEVAL}),
    "duo-query-heads": ("duo", {**GEOMETRY, "retrieval_heads": ((0, 2), (1, 7)), "granularity": "query_head"}),
    "razor": ("razor", {**GEOMETRY, "retrieval_heads": RETRIEVAL}),
    "razor-query-heads": ("razor", {**GEOMETRY, "retrieval_heads": ((0, 2), (1, 7)), "granularity": "query_head"}),
    "razor-no-sinks": ("razor", {"block_size": 8, "window": 8, "sink_tokens": 0, "retrieval_heads": ((1, 2),)}),
    "streaming": ("streaming", GEOMETRY),
}


def _model():
    return tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=128)


def _inputs(length: int = 150):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :9] = 0  # left padding in the second row: its sinks start at position 9
    return ids, mask


def _streaming_layers(cache) -> list[HeadAwareLayer]:
    return [layer for layer in cache.layers if isinstance(layer, HeadAwareLayer)]


@pytest.mark.parametrize("slack", [0, 16])
@pytest.mark.parametrize("chunk", [None, 24], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_logits_as_the_method_on_a_full_cache(name, chunk, slack):
    model = _model()
    ids, mask = _inputs()
    method = longattn.get_method(METHODS[name][0], **METHODS[name][1])
    with longattn.apply(model, method, kv_cache="full"):
        ref = _run(model, ids, mask, DynamicCache(), steps=30, chunk=chunk)
    with longattn.apply(model, method):
        cache = HeadAwareCache.for_method(method, model.config, slack=slack)
        got = _run(model, ids, mask, cache, steps=30, chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    layers = _streaming_layers(cache)
    assert layers, "the method declares streaming heads: some layer must keep only sinks + window"
    for layer in layers:  # it really dropped keys: 180 tokens against a 16-token window
        assert layer._gap >= 180 - 16 - 8 - slack - 16 - 8
        held = layer.get_seq_length() - layer._gap
        assert held <= layer._sink_len + 16 + 8 + slack + 8


def test_a_small_window_really_differs_from_dense():
    """Guard: the head-aware path is not silently dense (its streaming heads do lose the far keys)."""
    model = _model()
    ids, mask = _inputs()
    with torch.inference_mode():
        dense = _run(model, ids, mask, DynamicCache(), steps=5)
    with longattn.apply(model, longattn.get_method("duo", **METHODS["duo"][1])) as session:
        got = _run(model, ids, mask, session.new_cache(), steps=5)
    assert (got - dense).abs().max() > 1e-3


def test_apply_gives_generate_a_head_aware_cache_and_the_same_tokens():
    model = _model()
    ids, mask = _inputs(100)
    method = longattn.get_method("razor", **METHODS["razor"][1])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True)
    with longattn.apply(model, method, kv_cache="full"):
        ref = model.generate(ids, **kwargs)
    with longattn.apply(model, method):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    cache = got.past_key_values
    assert [type(layer) for layer in cache.layers] == [HeadAwareLayer, HeadAwareLayer]
    assert cache.get_seq_length() == got.sequences.shape[1] - 1
    assert _streaming_layers(cache)[1].stream_heads == (1, 2)
    assert not isinstance(ref.past_key_values.layers[0], HeadAwareLayer)  # "full" leaves the model's cache alone


def test_a_forward_without_a_cache_gets_one_and_a_held_cache_is_kept():
    model = _model()
    ids, mask = _inputs(60)
    method = longattn.get_method("duo", **METHODS["duo"][1])
    with longattn.apply(model, method) as session, torch.inference_mode():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert isinstance(out.past_key_values, HeadAwareCache)
        mine = DynamicCache()
        model(ids, attention_mask=mask, past_key_values=mine, use_cache=True)  # an empty DynamicCache: converted
        assert isinstance(mine.layers[1], HeadAwareLayer) and mine.get_seq_length() == 60
        held = session.new_cache()
        assert isinstance(held, HeadAwareCache)
        growing = longattn.GrowingCache()  # another cache class is used as given
        model(ids, attention_mask=mask, past_key_values=growing, use_cache=True)
        assert isinstance(growing.layers[0], GrowingLayer)
    with longattn.apply(model, method, kv_cache="full"), torch.inference_mode():
        assert type(model(ids, use_cache=True).past_key_values) is DynamicCache


def test_streaming_memory_stays_at_the_window_while_full_heads_grow():
    model = _model()
    ids, mask = _inputs(300)
    method = longattn.get_method("duo", **METHODS["duo"][1])
    with longattn.apply(model, method):
        cache = HeadAwareCache.for_method(method, model.config, slack=32)
        _run(model, ids, mask, cache, steps=100)
    layer = _streaming_layers(cache)[1]
    assert layer.get_seq_length() == 400
    assert layer._full[0].shape[2] >= 400  # retrieval heads: everything
    assert layer._stream[0].shape[2] <= layer._sink_len + 16 + 32 + 3 * 8  # streaming heads: sinks + window + slack
    held, allocated = cache.kv_bytes()
    full = DynamicCache()
    with torch.inference_mode():
        _run(model, ids, mask, full, steps=100)
    dense = sum(x.numel() * x.element_size() for layer in full.layers for x in (layer.keys, layer.values))
    # layer 0 keeps 1 of 4 KV heads, layer 1 2 of 4: 3/8 of the full cache, plus windows
    assert held < 0.45 * dense and allocated < 0.7 * dense  # the full heads grow with a 256-token headroom


def test_observer_sees_the_same_recall_in_one_pass_prefill():
    model = _model()
    ids, mask = _inputs(120)
    method = longattn.get_method("duo", **METHODS["duo"][1])
    recalls = []
    for kv_cache in ("full", "head_aware"):
        recorder = RecallRecorder(num_queries=8)
        with longattn.apply(model, method, observer=recorder, kv_cache=kv_cache), torch.inference_mode():
            out = model(ids, attention_mask=mask, use_cache=True)
            model(out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, :1]], 1),
                  past_key_values=out.past_key_values, use_cache=True)
        summary = recorder.summary()
        recalls.append([summary[k] for k in ("mean", "oracle_mean", "output_error_mean")])
    assert recalls[0] == pytest.approx(recalls[1], rel=1e-5, abs=1e-7)


def test_crop_within_the_window_and_batch_selection_match_a_full_cache():
    model = _model()
    ids, _ = _inputs(100)
    method = longattn.get_method("razor", **METHODS["razor"][1])
    outs = []
    for kv_cache in ("full", "head_aware"):
        with longattn.apply(model, method, kv_cache=kv_cache) as session, torch.inference_mode():
            cache = session.new_cache()
            model(ids, past_key_values=cache, use_cache=True)
            cache.crop(-3)
            cache.batch_select_indices(torch.tensor([1]))
            outs.append(model(ids[1:, 97:], past_key_values=cache, use_cache=True).logits)
            assert cache.get_seq_length() == 100
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-5)


def test_crop_past_what_streaming_heads_kept_is_refused():
    model = _model()
    ids, _ = _inputs(100)
    with longattn.apply(model, longattn.get_method("streaming", **GEOMETRY)) as session, torch.inference_mode():
        cache = HeadAwareCache.for_method(session.method, model.config, slack=0)
        model(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="cannot crop the head-aware cache to 60 tokens"):
            cache.crop(-40)


def test_beam_search_reorders_it():
    model = _model()
    ids, _ = _inputs(80)
    method = longattn.get_method("duo", **METHODS["duo"][1])
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with longattn.apply(model, method, kv_cache="full"):
        ref = model.generate(ids[:1], **kwargs)
    with longattn.apply(model, method):
        got = model.generate(ids[:1], **kwargs)
    assert torch.equal(got, ref)


def test_methods_that_read_every_key_keep_a_full_cache():
    model = _model()
    moba = longattn.get_method("moba", block_size=8, top_k=2, window=16)
    with pytest.raises(ValueError, match="kv_cache='head_aware' needs a method that declares streaming KV heads"):
        longattn.apply(model, moba, kv_cache="head_aware")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        longattn.apply(model, moba, kv_cache="ring")
    assert longattn.apply(model, moba).head_aware is False
    with_selector = longattn.get_method("duo", **GEOMETRY, retrieval_heads=RETRIEVAL, selector="moba")
    assert with_selector.streaming_kv_heads(1, 8, 4) is None
    extended = longattn.get_method("streaming", **GEOMETRY, positions="self_extend")
    assert extended.streaming_kv_heads(0, 8, 4) is None
    assert longattn.get_method("duo", **METHODS["duo"][1]).streaming_kv_heads(1, 8, 4) == (False, True, True, False)


def test_a_cache_built_for_another_method_is_refused():
    model = _model()
    ids, _ = _inputs(40)
    built_for = longattn.get_method("duo", **METHODS["duo"][1])
    other = longattn.get_method("duo", **{**METHODS["duo"][1], "window": 32})
    with longattn.apply(model, other), torch.inference_mode():
        with pytest.raises(ValueError, match="32-token window|16-token window"):
            model(ids, past_key_values=HeadAwareCache.for_method(built_for, model.config), use_cache=True)
    moved = longattn.get_method("duo", **{**METHODS["duo"][1], "retrieval_heads": ((1, 1),)})
    with longattn.apply(model, moved), torch.inference_mode():
        with pytest.raises(ValueError, match="build the cache for this method"):
            model(ids, past_key_values=HeadAwareCache.for_method(built_for, model.config), use_cache=True)


@pytest.mark.parametrize("length, drops", [(40, False), (400, True)])
def test_a_prompt_is_read_in_place_then_owned_after_the_attention_call(length, drops):
    # Streaming heads 1 and 2 (a contiguous run): the prompt step reads them from the model's own key / value
    # states, with no full-length copy; after `release` the layer owns what it keeps, so the model's tensors
    # changing (or being freed) cannot change the cache.
    layer = HeadAwareLayer((False, True, True), block_size=8, sink_tokens=4, window=16, slack=32)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 3, length, 8, generator=g) for _ in range(2))
    kv, _ = layer.update(k, v)
    assert kv.stream_keys.data_ptr() == k[:, 1:].data_ptr()  # read in place during the step
    layer.release(None)
    held = layer.split()
    assert held.stream_keys.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    expected_k = k[:, 1:].clone()
    kept = length - held.gap
    k.zero_()
    v.zero_()
    assert (layer.split().gap > 0) == drops
    if drops:
        # sinks, then the window's blocks: what later queries read, copied out before the step's states went
        sink = held.sink_len
        torch.testing.assert_close(held.stream_keys[:, :, :sink], expected_k[:, :, :sink])
        torch.testing.assert_close(held.stream_keys[:, :, sink:kept], expected_k[:, :, held.gap + sink:])
        assert layer._stream[0].shape[2] <= sink + 16 + 32 + 3 * 8  # sinks + window + slack, not the prompt
    else:
        torch.testing.assert_close(held.stream_keys, expected_k)
    # the next decode step appends after what is held
    k1, v1 = (torch.randn(1, 3, 1, 8, generator=g) for _ in range(2))
    kv, _ = layer.update(k1, v1)
    torch.testing.assert_close(kv.stream_keys[:, :, -1:], k1[:, 1:])
