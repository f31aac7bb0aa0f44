"""Why `quest` misses needles `moba` finds: where each scoring rule ranks the needle's block for the heads that
read it, at the answer position, in dense attention on the default model.

    python benchmarks/quest_needle.py [--length 2048] [--prompts 6]

For `niah_single` prompts (repeated filler, depths 0.2 / 0.5 / 0.8), a dense forward pass; at the last prompt
token, every head of layers 17-24 that puts at least 0.1 of its attention on the block holding the needle's
value; the rank of that block among the retrievable blocks (not sinks, not the last 8 blocks) under MoBA's
mean-key score, Quest's min/max bound, and each block's exact maximum q·k. A selector with top-k blocks finds
the needle in that head when the rank is below k.
"""

from __future__ import annotations

import argparse

import torch

import longattn
from longattn.bench.tasks import niah_single

LAYERS = range(17, 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()
    model, tok = longattn.load_model()
    ranks: dict[str, list[int]] = {"mean": [], "quest": [], "exact max": []}
    for seed in range(args.prompts):
        ex = niah_single.make(tok, args.length, [0.2, 0.5, 0.8][seed % 3], seed)
        ids = tok(ex.prompt, return_tensors="pt").input_ids
        at = ex.prompt.index(ex.answer)
        offsets = tok(ex.prompt, return_offsets_mapping=True)["offset_mapping"]
        needle = next(i for i, (a, b) in enumerate(offsets) if b > at) // 16

        def observe(layer, q, k, selection, scale, key_mask):
            if layer not in LAYERS:
                return
            qq, g = q[0, :, -1].float(), q.shape[1] // k.shape[1]
            n = k.shape[2] // 16
            kb = k[0].float()[:, : n * 16].view(k.shape[1], n, 16, -1).repeat_interleave(g, 0)  # [Hq, n, 16, D]
            exact = torch.einsum("hd,hnld->hnl", qq, kb)
            mass = torch.softmax(exact.flatten(1) * scale, -1).view_as(exact).sum(-1)  # [Hq, n]
            rules = {
                "mean": torch.einsum("hd,hnd->hn", qq, kb.mean(2)),
                "quest": torch.einsum("hd,hnd->hn", qq.clamp(min=0), kb.amax(2))
                + torch.einsum("hd,hnd->hn", qq.clamp(max=0), kb.amin(2)),
                "exact max": exact.amax(-1),
            }
            for h in range(qq.shape[0]):
                if mass[h, needle] < 0.1:
                    continue
                for name, s in rules.items():
                    ranks[name].append(int((s[h, 1 : n - 8] > s[h, needle]).sum()))

        with longattn.apply(model, longattn.get_method("dense"), observer=observe), torch.no_grad():
            model(ids, logits_to_keep=1)
    print(f"{args.prompts} prompts of {args.length} tokens, {len(ranks['mean'])} needle-reading heads (layers 17-24)")
    print("| rule | rank < 3 | rank < 8 | rank < 32 |")
    print("|---|---:|---:|---:|")
    for name, r in ranks.items():
        t = torch.tensor(r)
        print(f"| {name} | " + " | ".join(f"{float((t < k).float().mean()):.3f}" for k in (3, 8, 32)) + " |")


if __name__ == "__main__":
    main()
