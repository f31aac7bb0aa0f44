"""Block-sparse attention (the gather and fused-CPU backends) vs dense causal SDPA on CPU.

    python benchmarks/attention_op.py [--lengths 4096,8192,16384] [--density 0.1] [--repeats 3]

Each (operator, length) runs in a fresh subprocess so that its peak RSS is its own. Prints time, ratio to
dense SDPA measured in the same run, the selection's exact density (share of causal query-key pairs) and
peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

B, HQ, HKV, D = 1, 9, 3, 64  # the default model's attention shape


def make_selection(t: int, density: float, block: int, seed: int = 0):
    """Sinks (block 0), the diagonal block and random earlier blocks, ~``density`` of causal pairs per row."""
    from longattn.core.selection import Selection

    g = torch.Generator().manual_seed(seed)
    n = -(-t // block)
    mask = torch.zeros(B, HQ, n, n, dtype=torch.bool)
    for j in range(n):
        want = max(1, round(density * (j + 1)))
        mask[:, :, j, j] = True
        mask[:, :, j, 0] = True
        if want > 2 and j > 1:
            scores = torch.rand(B, HQ, j - 1, generator=g)
            pick = scores.topk(min(want - 2, j - 1), dim=-1).indices + 1
            mask[:, :, j].scatter_(-1, pick, True)
    return Selection.from_mask(mask, block, block)


def worker(op: str, t: int, density: float, block: int, repeats: int) -> dict:
    from longattn.core.selection import causal_pairs
    from longattn.ops import block_sparse_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, t, D, generator=g)
    k = torch.randn(B, HKV, t, D, generator=g)
    v = torch.randn(B, HKV, t, D, generator=g)
    sel = make_selection(t, density, block) if op != "sdpa" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if sel is not None:
            block_sparse_attention(q, k, v, sel, backend=op)
        else:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dens = float(sel.pairs(t, t).sum()) / (causal_pairs(t, t) * B * HQ) if sel is not None else 1.0
    return {"op": op, "t": t, "seconds": min(times), "density": dens, "peak_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("OP", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        op, t = args.worker
        print(json.dumps(worker(op, int(t), args.density, args.block, args.repeats)))
        return
    print(f"# block_sparse_attention vs causal SDPA, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# B={B} Hq={HQ} Hkv={HKV} D={D} float32, block {args.block}, target density {args.density}, "
          f"best of {args.repeats}; peak = max RSS above the inputs")
    print("| tokens | density | sdpa s | gather s | cpu s | gather speed-up | cpu speed-up "
          "| sdpa peak MiB | gather peak MiB | cpu peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in [int(x) for x in args.lengths.split(",")]:
        res = {}
        for op in ("sdpa", "gather", "cpu"):
            cmd = [sys.executable, __file__, "--worker", op, str(t), "--density", str(args.density),
                   "--block", str(args.block), "--repeats", str(args.repeats)]
            res[op] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        d, r, c = res["sdpa"], res["gather"], res["cpu"]
        print(f"| {t} | {c['density']:.3f} | {d['seconds']:.3f} | {r['seconds']:.3f} | {c['seconds']:.3f} | "
              f"{d['seconds'] / r['seconds']:.2f}x | {d['seconds'] / c['seconds']:.2f}x | {d['peak_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {c['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
