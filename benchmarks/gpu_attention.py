"""GPU benchmark: our Triton block-sparse attention vs dense FlashAttention (SDPA) vs FlexAttention.

    python benchmarks/gpu_attention.py                       # everything, prints markdown tables
    python benchmarks/gpu_attention.py --parts prefill,decode --lengths 8k,32k --out docs/results/gpu.md
    python benchmarks/gpu_attention.py --parts e2e --e2e-lengths 32k --model /path/to/model.gguf

Parts (all bf16, B=1, 32 query heads / 8 KV heads, D=128, as the issue asks):

- ``prefill``: attention of T queries over T keys at each length and density: ours (``backend="triton"``),
  ``scaled_dot_product_attention`` on the flash backend (causal, dense) and ``flex_attention`` compiled with
  the same BlockMask. Time (median of ``triton.testing.do_bench``) and ratio to dense. Also the fused block
  top-k (MoBA's selection: mean summaries, 16-query blocks) at the same length, to show what selecting costs.
- ``decode``: one query token per sequence over a cache of 32k .. 1M tokens: ours (split-K over the selected
  blocks, read from the cache in place) vs dense SDPA; time, ratio and achieved K/V bandwidth vs the GPU's peak.
- ``e2e``: the default model (or ``--model``) at 32k and 128k tokens: time to first token and decode tokens/s,
  ``dense`` vs ``moba`` and ``quest`` through ``longattn.apply`` (backend auto = triton).

Density is the share of causal query-key pairs each query block computes: sinks (block 0), the diagonal block
and random earlier blocks. Needs a CUDA GPU; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

B, HQ, HKV, D = 1, 32, 8, 128
DTYPE = torch.bfloat16
# Peak HBM bandwidth (bytes/s) by GPU name, for the achieved-bandwidth column (vendor figures).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                  "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12}


def parse_length(s: str) -> int:
    s = s.strip().lower()
    if s.endswith("m"):
        return int(float(s[:-1]) * 1024 * 1024)
    if s.endswith("k"):
        return int(float(s[:-1]) * 1024)
    return int(s)


def label(n: int) -> str:
    return f"{n // (1024 * 1024)}M" if n >= 1024 * 1024 and n % (1024 * 1024) == 0 else f"{n // 1024}k"


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (Triton's do_bench: warm-up, L2 flush, CUDA-event timing)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def environment() -> str:
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return (f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), driver "
            f"{driver}, CUDA {torch.version.cuda}; torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}; Python {platform.python_version()}")


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_properties(0).name
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return bw
    return None


def random_selection(t_q: int, t_k: int, qbs: int, bs: int, density: float, heads: int, seed: int = 0):
    """Sinks + diagonal + random earlier blocks per query block, ~``density`` of the causal pairs, built on the GPU.

    Returns a Selection ``[B, heads, Qblk, S]`` (queries are the last ``t_q`` of ``t_k`` keys).
    """
    from longattn.core.selection import Selection

    g = torch.Generator(device="cuda").manual_seed(seed)
    nqb, nkb = -(-t_q // qbs), -(-t_k // bs)
    offset = t_k - t_q
    last_blk = (offset + torch.clamp(torch.arange(nqb, device="cuda") * qbs + qbs, max=t_q) - 1) // bs  # [Qblk]
    want = torch.clamp((density * (last_blk + 1)).round().long(), min=1)
    width = int(want.max())
    # Random earlier blocks: the top (want - 2) of random scores over blocks 1 .. last-1, per query block.
    rows = []
    step = max(1, (1 << 27) // (heads * nkb))
    for j0 in range(0, nqb, step):
        j1 = min(nqb, j0 + step)
        scores = torch.rand(B, heads, j1 - j0, nkb, device="cuda", generator=g)
        blocks = torch.arange(nkb, device="cuda")
        eligible = (blocks > 0) & (blocks.view(1, -1) < last_blk[j0:j1].view(-1, 1))
        scores = scores.masked_fill(~eligible, -1.0)
        extra = max(width - 2, 0)
        if extra:
            top = scores.topk(min(extra, nkb), dim=-1)
            slot = torch.arange(top.indices.shape[-1], device="cuda")
            keep = (top.values >= 0) & (slot < (want[j0:j1] - 2).clamp(min=0).view(1, 1, -1, 1))
            picked = torch.where(keep, top.indices, -1)
        else:
            picked = torch.full((B, heads, j1 - j0, 0), -1, device="cuda", dtype=torch.long)
        fixed = torch.stack([torch.zeros_like(last_blk[j0:j1]), last_blk[j0:j1]], -1).view(1, 1, -1, 2)
        rows.append(torch.cat([fixed.expand(B, heads, -1, -1), picked], -1))
    ids = torch.cat(rows, dim=2)
    ids = torch.where(ids >= 0, ids, nkb)
    # Block 0 twice (sink == diagonal for the first query blocks): drop the repeat.
    ids = ids.sort(-1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(dup, nkb, ids).sort(-1).values
    kept = ids < nkb
    return Selection(torch.where(kept, ids, -1).int().contiguous(), kept.sum(-1, dtype=torch.int32), qbs, bs)


def dense_prefill(q, k, v) -> Callable[[], Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run()
        return run
    except RuntimeError:  # a flash build without GQA: repeat K/V once, outside the timed region
        kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)

        def run_repeated():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        return run_repeated


def part_prefill(lengths: list[int], densities: list[float], block_sizes: list[int], qbs: int) -> list[str]:
    from longattn.core.selection import causal_pairs
    from longattn.ops import block_sparse_attention
    from longattn.ops.block_sparse.flex import block_sparse_attention_flex
    from longattn.ops.block_topk import block_topk

    lines = ["| T | block | density | dense flash ms | ours ms | ours × | flex ms | flex × | ours vs flex | top-k select ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, HQ, t, D, device="cuda", dtype=DTYPE, generator=g)
        k = torch.randn(B, HKV, t, D, device="cuda", dtype=DTYPE, generator=g)
        v = torch.randn(B, HKV, t, D, device="cuda", dtype=DTYPE, generator=g)
        dense_ms = bench_ms(dense_prefill(q, k, v))
        for bs in block_sizes:
            # MoBA-style selection on this length: mean summaries, 16-query blocks, top 5 % of blocks.
            nkb = -(-t // bs)
            summaries = k.float().view(B, HKV, nkb, bs, D).mean(3, keepdim=True) if t % bs == 0 else None
            for density in densities:
                sel = random_selection(t, t, qbs, bs, density, HKV)
                real = int(sel.pairs(t, t).sum()) / (B * HKV * causal_pairs(t, t))
                ours_ms = bench_ms(lambda: block_sparse_attention(q, k, v, sel, backend="triton"))
                try:
                    flex_ms = bench_ms(lambda: block_sparse_attention_flex(q, k, v, sel))
                    flex = f"{flex_ms:.2f} | {dense_ms / flex_ms:.1f} | {flex_ms / ours_ms:.2f}×"
                except Exception as exc:  # noqa: BLE001 - report, do not hide: the table says why
                    flex = f"failed ({type(exc).__name__}) | – | –"
                sel_ms = "–"
                if summaries is not None:
                    top_k = max(1, round(density * nkb))
                    nqb = -(-t // 16)
                    limit = torch.full((nqb,), nkb, device="cuda", dtype=torch.int32)
                    zero = torch.zeros(B, device="cuda", dtype=torch.int32)
                    sel_ms = f"{bench_ms(lambda: block_topk(q, summaries, 'mean', min(top_k, 512), 16, limit, zero, zero)):.2f}"
                lines.append(f"| {label(t)} | {bs} | {real:.1%} | {dense_ms:.2f} | {ours_ms:.2f} | "
                             f"{dense_ms / ours_ms:.1f} | {flex} | {sel_ms} |")
                print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines


def part_decode(lengths: list[int], densities: list[float], bs: int) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn.ops import block_sparse_attention

    peak = peak_bandwidth()
    lines = ["| cache | density | dense ms | dense GB/s | ours ms | ours × | ours GB/s | ours % of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for t in lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE, generator=g)
        k = torch.randn(B, HKV, t, D, device="cuda", dtype=DTYPE, generator=g)
        v = torch.randn(B, HKV, t, D, device="cuda", dtype=DTYPE, generator=g)

        def dense():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        dense_ms = bench_ms(dense)
        kv_bytes = 2 * k.numel() * k.element_size()
        for density in densities:
            sel = random_selection(1, t, 1, bs, density, HKV)
            read = int(sel.counts.sum()) * bs * D * 2 * k.element_size()
            ours_ms = bench_ms(lambda: block_sparse_attention(q, k, v, sel, backend="triton"))
            gbs = read / (ours_ms * 1e-3) / 1e9
            pct = f"{gbs * 1e9 / peak:.0%}" if peak else "n/a"
            lines.append(f"| {label(t)} | {read / kv_bytes:.1%} | {dense_ms:.3f} | {kv_bytes / (dense_ms * 1e-3) / 1e9:.0f} | "
                         f"{ours_ms:.3f} | {dense_ms / ours_ms:.1f} | {gbs:.0f} | {pct} |")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines


def _generate_timed(model: Any, method: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    """Prefill ``ids [1, T]`` then ``new_tokens`` greedy steps under ``method`` (None: dense SDPA).

    Returns (time to first token in s, decode tokens/s as the median step, prefill density).
    """
    import contextlib

    import longattn

    ctx = longattn.apply(model, method) if method is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx as session:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)  # logits of the last position only
        torch.cuda.synchronize()
        ttft = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            torch.cuda.synchronize()
            s0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - s0)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    density = session.prefill_stats.density if session is not None else 1.0
    return ttft, 1.0 / statistics.median(steps[2:] or steps), density


def part_e2e(lengths: list[int], model_path: str | None, new_tokens: int) -> list[str]:
    import longattn

    model, _ = longattn.load_model(model_path, dtype=DTYPE)
    model = model.to("cuda").eval()
    settings: list[tuple[str, Any]] = [("dense", None), ("moba", longattn.get_method("moba")),
                                       ("quest", longattn.get_method("quest"))]
    vocab = int(model.config.vocab_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Warm-up: Triton compiles each kernel variant on first use; that is not the method's time.
    warm = torch.randint(vocab // 8, vocab // 2, (1, 2048), device="cuda", generator=gen)
    for _, method in settings:
        _generate_timed(model, method, warm, 3)
    lines = ["| T | method | TTFT s | TTFT × | decode tok/s | decode × | prefill density |", "|---|---|---|---|---|---|---|"]
    for t in lengths:
        ids = torch.randint(vocab // 8, vocab // 2, (1, t), device="cuda", generator=gen)
        base: dict[str, float] = {}
        for name, method in settings:
            ttft, tps, density = _generate_timed(model, method, ids, new_tokens)
            base.setdefault("ttft", ttft)
            base.setdefault("tps", tps)
            lines.append(f"| {label(t)} | {name} | {ttft:.2f} | {base['ttft'] / ttft:.1f} | {tps:.1f} | "
                         f"{tps / base['tps']:.1f} | {density:.1%} |")
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="prefill,decode,e2e")
    p.add_argument("--lengths", default="8k,32k,128k", help="prefill lengths")
    p.add_argument("--densities", default="0.02,0.05,0.10")
    p.add_argument("--block-sizes", default="64,16", help="prefill key-block sizes")
    p.add_argument("--q-block", type=int, default=64, help="prefill query-block size")
    p.add_argument("--decode-lengths", default="32k,128k,512k,1M")
    p.add_argument("--decode-block", type=int, default=16)
    p.add_argument("--e2e-lengths", default="32k,128k")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None, help="also write the tables as markdown here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention.py needs a CUDA GPU (the Triton kernels' CPU checks are the tests: "
              "TRITON_INTERPRET=1 pytest tests/ops)", file=sys.stderr)
        return 2
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = set(parts) - {"prefill", "decode", "e2e"}
    if unknown:
        p.error(f"--parts takes prefill, decode, e2e; got {sorted(unknown)}")
    densities = [float(x) for x in a.densities.split(",")]
    env = environment()
    print(env, flush=True)
    doc = ["# GPU results (benchmarks/gpu_attention.py)", "", env, "",
           f"Shapes: bf16, B={B}, {HQ} query heads / {HKV} KV heads, D={D}. Times are medians of "
           "triton.testing.do_bench; × is dense time / method time (higher is faster).", ""]
    if "prefill" in parts:
        doc += ["## Prefill attention", "", f"Query blocks of {a.q_block}; flex uses the same BlockMask.", ""]
        doc += part_prefill([parse_length(x) for x in a.lengths.split(",")], densities,
                            [int(x) for x in a.block_sizes.split(",")], a.q_block) + [""]
    if "decode" in parts:
        doc += ["## Decode step", "", f"One query token, selection per KV head, {a.decode_block}-token blocks, split-K.", ""]
        doc += part_decode([parse_length(x) for x in a.decode_lengths.split(",")], densities, a.decode_block) + [""]
    if "e2e" in parts:
        doc += ["## End to end (default model)", "", f"Random tokens; {a.new_tokens} decode steps.", ""]
        doc += part_e2e([parse_length(x) for x in a.e2e_lengths.split(",")], a.model, a.new_tokens) + [""]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("\n".join(doc) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
