"""Block scoring rules against the block oracle, per layer, on one natural-text prompt (dense forward pass).

    python benchmarks/scoring_rules.py [--model smollm2-135m] [--length 4096] [--top-k 8] [--seed 1]

For 12 query blocks of 16 queries spread over the second half of the prompt, every head keeps 16 sink tokens,
a window of T/64 tokens and the ``--top-k`` 16-token blocks a rule ranks highest (one pick per query block,
as in prefill); the table is the share of dense softmax mass those blocks hold, averaged over heads, queries
and query blocks, per layer. Rules: ``mean`` (MoBA: each query against each block's mean key, max over the
query block), ``quest`` (the min/max bound), ``exactmax`` (each query against every key, max over the block
and the query block: a full q·K pass), ``meanq_exact`` (``blockmax``: the query block's mean query against
every key, max over the block: MoBA's cost), ``meanq_sketchR`` (the same in an R-dimensional PCA sketch of the
layer's keys, Loki-style), ``sketch16_per_query`` (each query alone in the 16-dim sketch: decode), ``mean+std``
(a diagonal second-moment term), ``mean+sink2`` (two of the slots given to the blocks the step's mean query
scores highest: online sink-awareness) and ``oracle`` (the blocks holding the most mass).
"""

from __future__ import annotations

import argparse

import torch

import longattn
from longattn.bench.tasks import niah_phrased

BS = QBS = SINK = 16


def pick_mass(pb: torch.Tensor, scores: torch.Tensor, static: torch.Tensor, eligible: torch.Tensor, k: int) -> float:
    """Mass of static + the top-``k`` eligible blocks of ``scores [H, Nblk]``; ``pb [H, rows, Nblk]``."""
    sc = scores.masked_fill(~eligible, float("-inf"))
    keep = torch.zeros_like(sc, dtype=torch.bool).scatter(-1, sc.topk(k, -1).indices, True) | static
    return float((pb * keep.unsqueeze(1)).sum(-1).mean())


def sketch(k: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` principal directions of each KV head's keys: ``k [Hkv, T, D]`` -> ``[Hkv, D, r]``."""
    c = k - k.mean(1, keepdim=True)
    return torch.linalg.eigh(c.transpose(1, 2) @ c).eigenvectors.flip(-1)[..., :r]


def layer_rules(q: torch.Tensor, k: torch.Tensor, scale: float, top_k: int, window: int) -> dict[str, float]:
    """``q [Hq, T, D]``, ``k [Hkv, T, D]`` of one layer -> mass kept by each rule."""
    hq, t, d = q.shape
    g = hq // k.shape[0]
    rep = lambda x: x.repeat_interleave(g, 0)  # noqa: E731
    nkb = t // BS
    kb = rep(k[:, : nkb * BS].view(k.shape[0], nkb, BS, d))  # [Hq, Nblk, BS, D]
    mean, lo, hi, std = kb.mean(2), kb.amin(2), kb.amax(2), kb.std(2)
    sk = {r: rep(sketch(k, r)) for r in (8, 16, 32)}
    out: dict[str, list[float]] = {}
    for qb in torch.linspace(nkb // 4, nkb - 1, 12).long().unique().tolist():
        rows = torch.arange(qb * QBS, min(t, (qb + 1) * QBS))
        qq = q[:, rows]  # [Hq, r, D]
        s = torch.einsum("hrd,htd->hrt", qq, rep(k)) * scale
        s = s.masked_fill(torch.arange(t).view(1, -1) > rows.view(-1, 1), float("-inf"))
        pb = torch.softmax(s, -1)[..., : nkb * BS].view(hq, len(rows), nkb, BS).sum(-1)  # [Hq, r, Nblk]
        blocks = torch.arange(nkb)
        static = (blocks < SINK // BS) | ((blocks >= (qb * QBS - window) // BS) & (blocks <= qb))
        eligible = ~static & (blocks < qb)
        qm = qq.mean(1)  # [Hq, D]
        rules = {
            "mean": torch.einsum("hrd,hnd->hrn", qq, mean).amax(1),
            "quest": (torch.einsum("hrd,hnd->hrn", qq.clamp(min=0), hi)
                      + torch.einsum("hrd,hnd->hrn", qq.clamp(max=0), lo)).amax(1),
            "exactmax": torch.einsum("hrd,hnld->hrnl", qq, kb).amax(-1).amax(1),
            "meanq_exact": torch.einsum("hd,hnld->hnl", qm, kb).amax(-1),
            "mean+std": (torch.einsum("hrd,hnd->hrn", qq, mean)
                         + torch.einsum("hrd,hnd->hrn", qq**2, std**2).sqrt()).amax(1),
        }
        for r, p in sk.items():
            kr = torch.einsum("hnld,hdk->hnlk", kb, p)
            rules[f"meanq_sketch{r}"] = torch.einsum("hk,hnlk->hnl", torch.einsum("hd,hdk->hk", qm, p), kr).amax(-1)
        res = {name: pick_mass(pb, sc, static, eligible, top_k) for name, sc in rules.items()}
        # Decode-like: each query row picks alone in the 16-dim sketch.
        kr = torch.einsum("hnld,hdk->hnlk", kb, sk[16])
        per = torch.einsum("hrk,hnlk->hrnl", torch.einsum("hrd,hdk->hrk", qq, sk[16]), kr).amax(-1)
        per = per.masked_fill(~eligible, float("-inf"))
        keep = torch.zeros_like(per, dtype=torch.bool).scatter(-1, per.topk(top_k, -1).indices, True) | static
        res["sketch16_per_query"] = float((pb * keep).sum(-1).mean())
        # Online sink-awareness: two slots for the blocks the mean query of everything so far scores highest.
        col = torch.einsum("hd,hnld->hnl", q[:, : qb * QBS].mean(1), kb).amax(-1).masked_fill(~eligible, float("-inf"))
        sc = rules["mean"].masked_fill(~eligible, float("-inf")).scatter(-1, col.topk(2, -1).indices, float("inf"))
        res["mean+sink2"] = pick_mass(pb, sc, static, eligible, top_k)
        res["oracle"] = pick_mass(pb, pb.amax(1), static, eligible, top_k)
        for name, v in res.items():
            out.setdefault(name, []).append(v)
    return {name: sum(v) / len(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model, tok = longattn.load_model(args.model)
    ex = niah_phrased.make(tok, args.length, 0.5, args.seed)
    ids = tok(ex.prompt, return_tensors="pt").input_ids
    captured: dict[int, tuple] = {}

    def observe(layer, q, k, selection, scale, key_mask):
        captured[layer] = (q[0].float().clone(), k[0].float().clone(), scale)

    with longattn.apply(model, longattn.get_method("dense"), observer=observe), torch.no_grad():
        model(ids, logits_to_keep=1)
    rows = {layer: layer_rules(*captured[layer], args.top_k, args.length // 64) for layer in sorted(captured)}
    names = list(next(iter(rows.values())))
    print(f"{args.model}, {ids.shape[1]} tokens (niah_phrased seed {args.seed}), top-{args.top_k} blocks of {BS} "
          f"+ {SINK} sinks + window {args.length // 64}")
    print("| layer | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for layer, res in rows.items():
        print(f"| {layer} | " + " | ".join(f"{res[n]:.3f}" for n in names) + " |")
    print("| mean | " + " | ".join(f"{sum(r[n] for r in rows.values()) / len(rows):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
