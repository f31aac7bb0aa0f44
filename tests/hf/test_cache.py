"""GrowingCache: the same logits as DynamicCache (prefill, decode, chunks, padding, crop, batch selection), while
appending in place; the native operator reads its views without a copy."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import longattn
from longattn.hf.cache import GrowingCache
from longattn.ops.block_sparse import native
from tests.conftest import tiny_model
from tests.ops.common import make_qkv, random_selection


def _run(model, ids, mask, cache, steps=5, chunk=None):
    """Prefill (in chunks of ``chunk``) then ``steps`` greedy steps; every step's last logits ``[B, V]``."""
    logits = []
    chunk = chunk or ids.shape[1]
    with torch.inference_mode():
        for first in range(0, ids.shape[1], chunk):
            out = model(ids[:, first:first + chunk], attention_mask=mask[:, :first + chunk], past_key_values=cache,
                        use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("method", [None, "moba", "streaming"])
@pytest.mark.parametrize("chunk", [None, 24], ids=["whole", "chunked"])
def test_same_logits_as_dynamic_cache(method, chunk):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 70), generator=g)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0  # left padding in the second row
    kwargs = {} if method is None else {"block_size": 8, "top_k": 1, "window": 8, "sink_tokens": 4}
    if method == "streaming":
        kwargs = {"sink_tokens": 4, "window": 16}

    def both():
        return _run(model, ids, mask, DynamicCache(), chunk=chunk), _run(model, ids, mask, GrowingCache(), chunk=chunk)

    if method is None:
        ref, got = both()
    else:
        with longattn.apply(model, longattn.get_method(method, **kwargs)):
            ref, got = both()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_appends_in_place_and_grows_by_reallocating():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 40))
    cache = GrowingCache()
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        buf = layer._buffers[0]
        assert buf.shape[-2] > 40  # headroom
        assert layer.keys.data_ptr() == buf.data_ptr() and layer.keys.shape[-2] == 40
        first_keys = layer.keys.clone()
        for _ in range(buf.shape[-2] - 40):  # fill the headroom: no reallocation, no copy of the cache
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            assert layer._buffers[0] is buf
        out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert layer._buffers[0] is not buf and layer._buffers[0].shape[-2] > buf.shape[-2]  # full: a bigger buffer
    torch.testing.assert_close(layer.keys[:, :, :40], first_keys, rtol=0, atol=0)  # content kept
    assert cache.get_seq_length() == buf.shape[-2] + 1


def test_crop_and_batch_selection_are_adopted():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 30))
    caches = DynamicCache(), GrowingCache()
    outs = []
    with torch.inference_mode():
        for cache in caches:
            model(ids, past_key_values=cache, use_cache=True)
            cache.crop(-5)  # drop the last 5 tokens
            cache.batch_select_indices(torch.tensor([1]))
            outs.append(model(ids[1:, 25:], past_key_values=cache, use_cache=True).logits)
            assert cache.get_seq_length() == 30
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_generate_takes_it():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 20))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    cache = GrowingCache()
    assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs), ref)
    assert cache.get_seq_length() == ref.shape[1] - 1


@pytest.mark.skipif(not native.native_available(), reason=native.native_unavailable_reason())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_reads_a_cache_view_in_place(dtype):
    q, k, v = make_qkv(2, 4, 2, 50, 100, 64, dtype, seed=3)
    kbuf = torch.full((2, 2, 160, 64), float("nan"), dtype=dtype)  # NaN headroom: a read past Tk would show
    vbuf = kbuf.clone()
    kbuf[:, :, :100], vbuf[:, :, :100] = k, v
    kview, vview = kbuf[:, :, :100], vbuf[:, :, :100]
    assert native._rows_in_place(kview) and not kview.is_contiguous()
    sel = random_selection(2, 4, 50, 100, 16, 16, 0.5, seed=4)
    out, lse = native.block_sparse_attention_native(q, kview, vview, sel, q_offset=50)
    ref, ref_lse = native.block_sparse_attention_native(q, k, v, sel, q_offset=50)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
