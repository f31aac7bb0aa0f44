"""Prefill time of duo against dense SDPA on the default model: does keeping 75% of KV heads local pay off?

    python benchmarks/duo_prefill.py [--lengths 2k,4k,8k] [--share 0.25] [--repeats 2]

`duo` (its retrieval KV heads are dense heads of its Selection, which the operator runs through fused SDPA;
streaming heads through the block-sparse backend), the same `duo` with the dense flag dropped so that every
head goes through the block-sparse backend (`backend="gather"`), and `streaming`, each timed
on the whole 30-layer forward pass of one niah_single prompt (median of --repeats), with the ratio to dense
SDPA measured in the same run. The profile is docs/results/heads/smollm2_profile.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import longattn
from longattn.bench.runner import parse_lengths
from longattn.bench.tasks import niah_single
from longattn.methods.duo import Duo


class OperatorOnly(Duo):
    """``duo`` with every head through the block-sparse backend: the retrieval heads' dense flag dropped."""

    def select(self, q, summaries, ctx):
        return super().select(q, summaries, ctx).without_dense_heads()


def prefill_seconds(model, ids, method, backend: str, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        with torch.inference_mode(), longattn.apply(model, method, backend=backend) as session:
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times), session.prefill_stats.density


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2k,4k,8k")
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", type=Path, default=Path("docs/results/heads/smollm2_profile.json"))
    args = parser.parse_args()
    model, tok = longattn.load_model()
    profile = longattn.HeadProfile.load(args.profile)
    common = dict(sink_tokens=4, window=256)
    duo = longattn.get_method("duo", profile=profile, retrieval_share=args.share, **common)
    operator_only = OperatorOnly(profile=profile, retrieval_share=args.share, **common)
    rows = [("dense (SDPA)", longattn.get_method("dense"), "auto"), (f"duo {args.share:.0%} fast path", duo, "auto"),
            (f"duo {args.share:.0%} operator only", operator_only, "gather"),
            ("streaming", longattn.get_method("streaming", **common), "auto")]
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| tokens | method | density | prefill s | vs dense | KV a head-aware cache holds |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in parse_lengths(args.lengths):
        example = niah_single.make(tok, length, 0.5, 0, haystack="repeat")
        ids = tok(example.prompt, return_tensors="pt").input_ids
        t = ids.shape[1]
        layout = (t, profile.num_layers, profile.num_heads, profile.num_kv_heads)
        dense_kv = profile.num_layers * profile.num_kv_heads * t
        base = None
        for label, method, backend in rows:
            seconds, density = prefill_seconds(model, ids, method, backend, args.repeats if length <= 4096 else 1)
            base = base or seconds
            if method.name == "duo":
                kv = method.kv_cache_tokens(*layout) / dense_kv
            elif method.name == "streaming":
                kv = longattn.get_method("duo", retrieval_heads=(), **common).kv_cache_tokens(*layout) / dense_kv
            else:
                kv = 1.0
            print(f"| {t} | {label} | {density:.3f} | {seconds:.2f} | {base / seconds:.2f}x | {kv:.0%} |", flush=True)


if __name__ == "__main__":
    main()
