"""Position policies: exact re-rotation, the operator against a from-scratch RoPE reference, and the window bound."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.core.positions import POLICIES, DualChunk, InfLLMLayout, LongHeadsLayout, Original, SelfExtend, position_policy
from longattn.core.reposition import Reposition
from longattn.core.rope import Rope, rotate
from longattn.core.selection import Selection
from longattn.ops import block_sparse_attention, block_sparse_attention_gather
from tests.conftest import tiny_model

D = 16
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def rope_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE written out: ``x [..., n, D]`` pre-RoPE at ``positions [..., n]``."""
    freqs = positions.to(torch.float64).unsqueeze(-1) * INV_FREQ.to(torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    rot = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), dim=-1)
    return (x.double() * emb.cos() + rot.double() * emb.sin()).float()


def test_rotating_forward_then_back_returns_the_input():
    x = torch.randn(2, 3, 50, D)
    delta = torch.randint(-5000, 5000, (2, 3, 50))
    torch.testing.assert_close(rotate(rotate(x, delta, INV_FREQ), -delta, INV_FREQ), x, atol=1e-5, rtol=1e-5)
    assert torch.equal(rotate(x, torch.zeros(2, 3, 50, dtype=torch.long), INV_FREQ), x)


def test_rotation_moves_a_rope_vector_to_the_new_position():
    x = torch.randn(1, 40, D)
    p = torch.randint(0, 3000, (1, 40))
    delta = torch.randint(-2000, 2000, (1, 40))
    torch.testing.assert_close(rotate(rope_at(x, p), delta, INV_FREQ), rope_at(x, p + delta), atol=1e-4, rtol=1e-4)


def test_rotating_q_and_k_by_the_same_delta_keeps_scores():
    q, k = torch.randn(30, D), torch.randn(30, D)
    delta = torch.full((30,), 1234)
    before = q @ k.T
    after = rotate(q, delta, INV_FREQ) @ rotate(k, delta, INV_FREQ).T
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_rotate_rejects_a_wrong_frequency_vector():
    with pytest.raises(ValueError, match="inv_freq must be"):
        rotate(torch.randn(4, D), torch.zeros(4), INV_FREQ[:3])


def test_policy_names_resolve_and_bad_names_raise():
    assert [position_policy(n).name for n in POLICIES] == list(POLICIES)
    assert position_policy(SelfExtend(4)) == SelfExtend(4)
    with pytest.raises(ValueError, match="positions must be one of"):
        position_policy("yarn")
    with pytest.raises(ValueError, match="group_size"):
        SelfExtend(0)


# ------------------------------------------------------------------------ the operator vs a RoPE reference


def _virtual_distance(policy, i: int, j: int, selected: list[int], window: int, bs: int, qbs: int) -> int:
    """The distance the policy assigns query position ``i`` and key position ``j``, written per the papers."""
    first = (i // qbs) * qbs
    lo = min(max(first - window, 0) // bs, first // bs)
    block = j // bs
    if isinstance(policy, Original) or (block >= lo and not isinstance(policy, DualChunk)):
        return i - j
    if isinstance(policy, LongHeadsLayout):
        far = [n for n in selected if n < lo]
        start = lo * bs - (len(far) - far.index(block)) * bs
        return i - (start + j - block * bs)
    if isinstance(policy, InfLLMLayout):
        return i - (lo * bs - 1)
    if isinstance(policy, DualChunk):  # ChunkLlama: keys at p mod L; the query's index depends on the key's chunk
        s, big = policy.chunk_size, policy.chunk_size - policy.local_window
        if i // big == j // big:
            return i - j
        if j // big == i // big - 1:
            return min(i % big + big, s) - j % big
        return min(2 * big - 1, s) - j % big
    g = policy.group_size
    return i // g - j // g + window - window // g


def _reference(q0, k0, v, selection, policy, window):
    """Attention with pre-RoPE ``q0 [Hq, T, D]``, ``k0, v [Hkv, T, D]``: each pair scored at its virtual distance."""
    hq, t, _ = q0.shape
    group = hq // k0.shape[0]
    bs, qbs = selection.kv_block_size, selection.query_block_size
    out = torch.zeros(hq, t, D)
    for h in range(hq):
        for i in range(t):
            row = selection.indices[0, h, i // qbs]
            chosen = sorted(int(n) for n in row if n >= 0)
            keys = [j for n in chosen for j in range(n * bs, min((n + 1) * bs, t)) if j <= i]
            dist = torch.tensor([_virtual_distance(policy, i, j, chosen, window, bs, qbs) for j in keys])
            # <R(p_i) q, R(p_j) k> depends on p_i - p_j only: put the key at 0 and the query at the distance.
            qv = rope_at(q0[h, i].expand(len(keys), D), dist)
            scores = (qv * k0[h // group, keys]).sum(-1) / math.sqrt(D)
            out[h, i] = torch.softmax(scores, 0) @ v[h // group, keys]
    return out


def _random_selection(hq, t, qbs, bs, window, keep, seed):
    """Sinks + window + random earlier blocks, ``[1, Hq, Qblk, S]``."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-t // qbs), -(-t // bs)
    mask = torch.rand(1, hq, nqb, nkb, generator=g) < keep
    for j in range(nqb):
        first, last = j * qbs, min((j + 1) * qbs, t) - 1
        lo = min(max(first - window, 0) // bs, first // bs)
        mask[..., j, lo : last // bs + 1] = True
        mask[..., j, 0] = True
        mask[..., j, last // bs + 1 :] = False
    return Selection.from_mask(mask, qbs, bs)


# "auto" runs every policy but longheads as region passes on the fastest backend (native where it builds);
# "gather" and "naive" keep their own policy code, except for dca, which only the region passes apply.
@pytest.mark.parametrize("backend", ["gather", "naive", "auto"])
@pytest.mark.parametrize("policy", [Original(), LongHeadsLayout(), InfLLMLayout(), SelfExtend(3),
                                    DualChunk(chunk_size=40, local_window=8)], ids=lambda p: p.name)
@pytest.mark.parametrize("bs, qbs, window", [(8, 8, 16), (8, 4, 8), (16, 16, 0)])
def test_operator_equals_rope_reference(policy, bs, qbs, window, backend):
    hq, hkv, t = 4, 2, 75
    g = torch.Generator().manual_seed(1)
    q0, k0, v = (torch.randn(h, t, D, generator=g) for h in (hq, hkv, hkv))
    p = torch.arange(t)
    q, k = rope_at(q0, p), rope_at(k0, p)
    selection = _random_selection(hq, t, qbs, bs, window, 0.3, seed=2)
    plan = Reposition(policy, Rope(INV_FREQ, 10_000), window)
    out, _ = block_sparse_attention(q[None], k[None], v[None], selection, reposition=plan, backend=backend)
    torch.testing.assert_close(out[0], _reference(q0, k0, v, selection, policy, window), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["gather", "naive", "auto"])
def test_decode_step_equals_rope_reference(backend):
    hq, hkv, t, bs, window = 4, 2, 90, 8, 16
    g = torch.Generator().manual_seed(3)
    q0, k0, v = (torch.randn(h, t, D, generator=g) for h in (hq, hkv, hkv))
    q, k = rope_at(q0, torch.arange(t)), rope_at(k0, torch.arange(t))
    for policy in (LongHeadsLayout(), InfLLMLayout(), SelfExtend(4), DualChunk(chunk_size=40, local_window=8)):
        full = _random_selection(hq, t, 1, bs, window, 0.3, seed=4)
        last = Selection(full.indices[:, :, -1:].contiguous(), full.counts[:, :, -1:].contiguous(), 1, bs)
        plan = Reposition(policy, Rope(INV_FREQ, 10_000), window)
        out, _ = block_sparse_attention(q[None, :, -1:], k[None], v[None], last, reposition=plan, backend=backend)
        expected = _reference(q0, k0, v, full, policy, window)[:, -1:]
        torch.testing.assert_close(out[0], expected, atol=1e-4, rtol=1e-4)


def test_a_policy_that_keeps_positions_equals_no_policy():
    q, k, v = (torch.randn(1, h, 90, D, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
    sel = _random_selection(4, 90, 8, 8, 16, 0.3, seed=9)
    # Bitwise on one backend: "auto" runs a policy on gather, and no policy on native where that builds.
    plain, plain_lse = block_sparse_attention(q, k, v, sel, backend="gather")
    kept, kept_lse = block_sparse_attention(q, k, v, sel, reposition=Reposition(Original(), Rope(INV_FREQ, 64), 16))
    assert torch.equal(kept, plain) and torch.equal(kept_lse, plain_lse)


def test_full_selection_under_longheads_or_group_one_keeps_real_positions():
    """Every block selected: the contiguous layout is the original one, and groups of 1 are exact distances."""
    hq, hkv, t, bs = 4, 2, 100, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, t, D, generator=g) for h in (hq, hkv, hkv))
    sel = Selection.from_mask(torch.ones(1, hq, -(-t // bs), -(-t // bs), dtype=torch.bool).tril(), bs, bs)
    plain, _ = block_sparse_attention_gather(q, k, v, sel)
    for policy in (LongHeadsLayout(), SelfExtend(1)):
        moved, _ = block_sparse_attention(q, k, v, sel, reposition=Reposition(policy, Rope(INV_FREQ, 4096), 16))
        torch.testing.assert_close(moved, plain, atol=1e-5, rtol=1e-5)
    moved, _ = block_sparse_attention(q, k, v, sel, reposition=Reposition(InfLLMLayout(), Rope(INV_FREQ, 4096), 16))
    assert (moved - plain).abs().max() > 1e-3  # infllm moves every far key, even when all are selected


def test_longheads_distances_never_exceed_the_attended_budget():
    """At 4,000 tokens with a 512-token trained window, every key LongHeads shows stays inside that window."""
    t, bs, qbs, window = 4000, 16, 16, 64
    nkb = -(-t // bs)
    idx_rows = []
    g = torch.Generator().manual_seed(6)
    for j in range(-(-t // qbs)):
        lo = min(max(j * qbs - window, 0) // bs, j * qbs // bs)
        picked = torch.randperm(max(lo, 1), generator=g)[:20].tolist() if lo > 0 else []
        idx_rows.append(sorted(set(picked) | {0} | set(range(lo, j * qbs // bs + 1))))
    width = max(map(len, idx_rows))
    idx = torch.tensor([r + [-1] * (width - len(r)) for r in idx_rows]).view(1, 1, -1, width)
    pos = (idx * bs).unsqueeze(-1) + torch.arange(bs)
    rows = (torch.arange(idx.shape[2]) * qbs).unsqueeze(1) + torch.arange(qbs)
    valid = (idx >= 0).unsqueeze(-1) & (pos <= rows[:, -1].view(1, 1, -1, 1, 1))
    plan = Reposition(LongHeadsLayout(), Rope(INV_FREQ, 512), window)
    far, block, query = plan.plan(idx, pos, rows, bs, valid)
    assert query is None
    distance = rows.view(1, 1, -1, qbs, 1, 1) - (pos + block).unsqueeze(3)
    seen = valid.unsqueeze(3) & (distance >= 0)
    assert int(distance[seen].max()) < 512
    assert bool(far.any()) and nkb * bs > 512  # far keys were moved, at a length 8x the window
    # Without the policy the same keys sit up to 4,000 tokens away.
    assert int((rows.view(1, 1, -1, qbs, 1, 1) - pos.unsqueeze(3))[seen].max()) > 3000


@pytest.mark.parametrize("backend", ["gather", "naive", "auto"])
def test_a_budget_beyond_the_trained_window_raises(backend):
    t, bs = 300, 16
    q, k, v = (torch.randn(1, h, t, D) for h in (2, 1, 1))
    sel = Selection.from_mask(torch.ones(1, 2, -(-t // bs), -(-t // bs), dtype=torch.bool).tril(), bs, bs)
    plan = lambda policy: Reposition(policy, Rope(INV_FREQ, 128), 16)  # noqa: E731
    with pytest.raises(ValueError, match="trained window of 128"):
        block_sparse_attention(q, k, v, sel, reposition=plan(LongHeadsLayout()), backend=backend)
    with pytest.raises(ValueError, match=r"group_size=\.\.\.\) to at least 3"):
        block_sparse_attention(q, k, v, sel, reposition=plan(SelfExtend(2)), backend=backend)
    block_sparse_attention(q, k, v, sel, reposition=plan(SelfExtend(3)), backend=backend)


def test_forced_fused_backend_refuses_block_moves_and_runs_region_policies():
    q, k, v = (torch.randn(1, h, 64, D) for h in (2, 1, 1))
    sel = Selection.from_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool).tril(), 16, 16)
    with pytest.raises(ValueError, match="reposition= .* runs on backend 'auto', 'gather' or 'naive'"):
        block_sparse_attention(q, k, v, sel, backend="cpu", reposition=Reposition(LongHeadsLayout(), Rope(INV_FREQ, 64), 0))
    plan = Reposition(InfLLMLayout(), Rope(INV_FREQ, 64), 16)
    fused, fused_lse = block_sparse_attention(q, k, v, sel, backend="cpu", reposition=plan)
    gathered, gathered_lse = block_sparse_attention(q, k, v, sel, backend="gather", reposition=plan)
    torch.testing.assert_close(fused, gathered, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_lse, gathered_lse, atol=1e-5, rtol=1e-5)


def test_dca_binds_its_sizes_to_the_trained_window_and_checks_them():
    plan = Reposition(DualChunk(), Rope(INV_FREQ, 8192), 128)
    assert (plan.policy.chunk_size, plan.policy.local_window, plan.policy.chunk_len) == (6144, 512, 5632)
    with pytest.raises(ValueError, match="local_window .* must be smaller than chunk_size"):
        DualChunk(chunk_size=64, local_window=64)
    with pytest.raises(ValueError, match="below the model's trained window"):
        Reposition(DualChunk(chunk_size=64), Rope(INV_FREQ, 64), 0)
    q, k, v = (torch.randn(1, h, 64, D) for h in (2, 1, 1))
    sel = Selection.from_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool).tril(), 16, 16)
    with pytest.raises(ValueError, match="multiple of the block size"):  # L = 40 - 4 = 36
        block_sparse_attention(q, k, v, sel, reposition=Reposition(DualChunk(40, 4), Rope(INV_FREQ, 64), 0))


def test_dca_distances_never_reach_the_chunk_size_at_any_length():
    policy = DualChunk(chunk_size=40, local_window=8)
    dist = [_virtual_distance(policy, i, j, [], 0, 8, 8) for i in range(0, 400, 7) for j in range(0, i + 1, 3)]
    assert max(dist) <= 40 and min(dist) >= 0


# ------------------------------------------------------------------------------------ reading the model


def test_rope_is_read_from_the_model():
    model = tiny_model("llama", max_position_embeddings=777)
    rope = Rope.from_model(model)
    assert rope.trained_window == 777
    torch.testing.assert_close(rope.inv_freq, INV_FREQ)


def test_unsupported_rope_variants_raise():
    model = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE type 'dynamic' is not supported"):
        Rope.from_model(model)


# ------------------------------------------------------------------------------ through longattn.apply


def _logits(model, ids, method, chunk=None):
    """Last-position logits of a prefill (one shot, or ``chunk`` tokens at a time) and of 3 greedy decode steps."""
    import longattn

    out = []
    with torch.no_grad(), longattn.apply(model, method):
        cache, step = None, chunk or ids.shape[1]
        for first in range(0, ids.shape[1], step):
            res = model(ids[:, first : first + step], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
        for _ in range(3):
            out.append(res.logits[:, -1])
            res = model(res.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
    return torch.cat(out)


@pytest.fixture(scope="module")
def short_window_model():
    """The tiny Llama told it was trained on 256 positions; prompts below are 600 tokens."""
    return tiny_model("llama", max_position_embeddings=256)


PROMPT = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy", ["longheads", "self_extend"])
def test_full_budget_with_a_neutral_layout_equals_sdpa(policy, short_window_model):
    import longattn

    positions = "longheads" if policy == "longheads" else SelfExtend(group_size=1)
    full = longattn.get_method("moba", block_size=16, top_k=1 << 10, window=32, positions=positions)
    model = tiny_model("llama")  # trained window 4096: the full layout fits
    torch.testing.assert_close(_logits(model, PROMPT, full), _logits(model, PROMPT, longattn.get_method("dense")),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["longheads", "infllm", "self_extend", "dca"])
def test_each_policy_changes_a_sparse_method_and_chunked_prefill_equals_one_shot(policy, short_window_model):
    import longattn

    moved = longattn.get_method("moba", block_size=16, top_k=4, window=32, positions=policy)
    plain = longattn.get_method("moba", block_size=16, top_k=4, window=32)
    one_shot = _logits(short_window_model, PROMPT, moved)
    assert (one_shot - _logits(short_window_model, PROMPT, plain)).abs().max() > 1e-4
    torch.testing.assert_close(_logits(short_window_model, PROMPT, moved, chunk=128), one_shot, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["infllm", "self_extend"])
def test_region_passes_in_a_model_equal_the_gather_path_in_chunks_and_decode(policy, short_window_model):
    """The session's region passes (native where it builds, moved keys kept between steps and extended by each
    step's new keys) against the gather path's policy code, which rotates everything at every step."""
    import longattn

    method = longattn.get_method("moba", block_size=16, top_k=4, window=32, positions=policy)
    fast = _logits(short_window_model, PROMPT, method, chunk=128)
    out = []
    with torch.no_grad(), longattn.apply(short_window_model, method, backend="gather"):
        cache = None
        for first in range(0, PROMPT.shape[1], 128):
            res = short_window_model(PROMPT[:, first : first + 128], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
        for _ in range(3):
            out.append(res.logits[:, -1])
            res = short_window_model(res.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
    torch.testing.assert_close(fast, torch.cat(out), atol=1e-4, rtol=1e-4)


def test_dense_with_a_policy_runs_through_the_operator(short_window_model):
    """Dense + self_extend is Self-Extend itself: grouped far distances, exact local ones (not SDPA)."""
    import longattn

    sdpa = _logits(short_window_model, PROMPT, longattn.get_method("dense"))
    extended = _logits(short_window_model, PROMPT, longattn.get_method("dense", window=64, positions=SelfExtend(4)))
    assert (extended - sdpa).abs().max() > 1e-4
    with pytest.raises(ValueError, match="trained window of 256"):  # every block, laid out contiguously: too long
        _logits(short_window_model, PROMPT, longattn.get_method("dense", positions="longheads"))


def test_hf_generate_with_chunked_prefill_matches_one_shot(short_window_model):
    import longattn

    method = longattn.get_method("moba", block_size=16, top_k=4, window=32, positions="longheads")
    with torch.no_grad(), longattn.apply(short_window_model, method):
        whole = short_window_model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        chunked = short_window_model.generate(PROMPT, max_new_tokens=4, do_sample=False, prefill_chunk_size=128)
    assert torch.equal(whole, chunked)


def test_policy_errors_are_clear(short_window_model):
    import longattn
    from longattn.hf import Session

    with pytest.raises(ValueError, match="positions must be one of"):
        longattn.get_method("moba", positions="rope")
    with pytest.raises(ValueError, match="needs the model's RoPE"):
        Session(longattn.get_method("moba", positions="infllm"))
    razor = longattn.get_method("razor", retrieval_heads=((0, 0),), positions="infllm")
    with pytest.raises(ValueError, match="cannot be combined with positions='infllm'"):
        longattn.apply(short_window_model, razor)


def test_cached_rotation_equals_the_reference():
    plan = Reposition(InfLLMLayout(), Rope(INV_FREQ, 8192), 16)
    x = torch.randn(2, 3, 7, 5, D)
    for delta in (torch.randint(-30_000, 30_000, (2, 3, 7, 5)), torch.randint(-100, 100, (2, 3, 7, 1))):
        torch.testing.assert_close(plan.rotate(x, delta), rotate(x, delta.expand(2, 3, 7, 5), INV_FREQ),
                                   atol=1e-5, rtol=1e-5)


def test_far_blocks_score_at_the_capped_distance_and_near_ones_at_their_own():
    """Content placed 5,000 or 20,000 tokens back scores the same (at the cap, 1,000); 300 back keeps its score."""
    plan = Reposition(LongHeadsLayout(score_cap=1000), Rope(INV_FREQ, 8192), 64)
    g = torch.Generator().manual_seed(7)
    q0, k0 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    bs, block = 16, 3
    centre = block * bs + bs // 2
    s = rope_at(k0.view(1, 1, 1, 1, D), torch.tensor([centre]).view(1, 1, 1, 1)).expand(1, 1, 4, 1, D)

    def score(q, summaries):  # moba's: query against the block mean, [B, H, Tq, Nblk]
        return torch.einsum("bhtd,bhnd->bhtn", q, summaries[:, :, :, 0])

    got, real = [], []
    for gap in (300, 5_000, 20_000):
        q = rope_at(q0.view(1, 1, 1, D), torch.tensor([centre + gap]).view(1, 1, 1))
        plain = score(q, s)
        got.append(float(plan.capped_scores(score, q, s, plain, centre + gap, bs)[0, 0, 0, block]))
        real.append(float(plain[0, 0, 0, block]))
    at_cap = float(rope_at(q0.view(1, D), torch.tensor([1000])) @ k0)
    assert got[1] == pytest.approx(at_cap, rel=1e-4) and got[2] == pytest.approx(at_cap, rel=1e-4)
    assert got[0] == pytest.approx(real[0], rel=1e-6)
    assert abs(real[1] - real[2]) > 1e-3  # at real positions the two far scores differ
