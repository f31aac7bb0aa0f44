"""CPU speed of the block-sparse operator: every CPU backend and compiled FlexAttention vs causal SDPA.

    python benchmarks/cpu_speed.py --quick [--out docs/results/cpu.md]     # 4k-16k, ~15 min on 2 cores
    python benchmarks/cpu_speed.py [--out docs/results/cpu.md]             # 4k-32k
    python benchmarks/cpu_speed.py --e2e [--out docs/results/cpu.md]       # and end to end (cpu_e2e.py), 2k-32k

Shapes are the default model's (B=1, Hq=9, Hkv=3, D=64) with random q/k/v; selections are per query head,
query blocks of 16, sinks and the diagonal block kept plus random earlier blocks to ~10% of the causal pairs
(30% at 2k/4k: the never-slower check). Each cell (op, dtype, block, tokens, density) runs in its own
subprocess, which times the op and causal SDPA of the same dtype alternately (the ratio is measured side
by side, so a neighbour's load hits both) and records the peak RSS of the op's first call above the inputs
before SDPA runs.
FlexAttention is ``torch.compile(flex_attention)`` fed the same Selection as a BlockMask; its first call
(compile) is reported apart from the steady time. Decode: one new query over a cache of 8k-32k keys,
~10% of the 16-token blocks selected per query head, median time per call (= per token per layer).

Finished cells are appended to ``<out>.jsonl`` and skipped on a rerun (``--fresh`` starts over), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from attention_op import B, D, HKV, HQ, make_selection  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREFILL_OPS = ("native", "gather", "cpu", "flex")
NOTES = "<!-- notes: kept by reruns -->"


def inputs(t_q: int, t_k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, t_q, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, t_k, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, t_k, D, generator=g).to(dtype)
    return q, k, v


def decode_selection(t: int, block: int, density: float, seed: int = 0):
    from longattn.core.selection import Selection

    g = torch.Generator().manual_seed(seed)
    n = -(-t // block)
    mask = torch.rand(B, HQ, 1, n, generator=g) < density
    mask[..., 0] = True  # sinks
    mask[..., -1] = True  # the newest block
    return Selection.from_mask(mask, 1, block)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> int:
    """Resets the peak RSS to the current RSS (Linux: clear_refs 5) and returns it, in KiB: the op's peak is then
    its own, not that of building the inputs (``ru_maxrss`` never goes down)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return status_kib("VmRSS")


def op_callable(op: str, q, k, v, sel, causal_sdpa: bool):
    """A no-argument call of ``op``, and its compile seconds (flex) or None."""
    from longattn.ops import block_sparse_attention

    if op == "sdpa":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal_sdpa, enable_gqa=True)), None
    if op != "flex":
        return (lambda: block_sparse_attention(q, k, v, sel, backend=op)), None
    from torch.nn.attention.flex_attention import flex_attention

    from longattn.ops.block_sparse.flex import selection_block_mask

    t_q, t_k = q.shape[2], k.shape[2]
    mask = selection_block_mask(sel, t_q, t_k, HQ, t_k - t_q)
    compiled = torch.compile(flex_attention)
    start = time.perf_counter()
    compiled(q, k, v, block_mask=mask, enable_gqa=True)  # compile (and one run)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiled(q, k, v, block_mask=mask, enable_gqa=True)
    return (lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)), first - (time.perf_counter() - start)


def worker(cell: dict) -> dict:
    dtype = DTYPES[cell["dtype"]]
    t = cell["t"]
    decode = cell["mode"] == "decode"
    q, k, v = inputs(1 if decode else t, t, dtype)
    sel = (decode_selection(t, cell["block"], cell["density"]) if decode
           else make_selection(t, cell["density"], cell["block"]))
    run, compile_s = op_callable(cell["op"], q, k, v, sel, not decode)  # flex compiles here
    base = reset_peak()
    run()  # warm-up (the native kernel builds or loads here), and the op's first allocations
    peak = (status_kib("VmHWM") - base) / 1024
    sdpa, _ = op_callable("sdpa", q, k, v, sel, not decode)
    sdpa()
    times: dict[str, list[float]] = {"op": [], "sdpa": []}
    for _ in range(cell["repeats"]):
        for name, fn in (("op", run), ("sdpa", sdpa)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    # Prefill: best of the repeats (the least disturbed); decode: the median of many short calls.
    pick = (lambda xs: sorted(xs)[len(xs) // 2]) if decode else min
    from longattn.core.selection import causal_pairs

    t_q = q.shape[2]
    density = float(sel.pairs(t_q, t).sum()) / (causal_pairs(t_q, t) * B * HQ)
    return {**cell, "seconds": pick(times["op"]), "sdpa_seconds": pick(times["sdpa"]), "peak_mib": peak,
            "compile_seconds": compile_s, "exact_density": density}


def cells(quick: bool, repeats: int) -> list[dict]:
    lengths = [4096, 8192, 16384] if quick else [4096, 8192, 16384, 32768]
    out = []
    for dtype in DTYPES:
        for block in (16, 64):
            for t in lengths:
                out += [dict(mode="prefill", op=op, dtype=dtype, block=block, t=t, density=0.1, repeats=repeats)
                        for op in PREFILL_OPS]
        for t in (2048, 4096):  # the never-slower check: 30% density
            out += [dict(mode="prefill", op=op, dtype=dtype, block=16, t=t, density=0.3, repeats=repeats)
                    for op in ("native", "gather")]
        for t in (8192, 16384, 32768):
            out += [dict(mode="decode", op=op, dtype=dtype, block=16, t=t, density=0.1, repeats=60)
                    for op in ("native", "gather")]
    return out


def key(cell: dict) -> str:
    return "|".join(str(cell[k]) for k in ("mode", "op", "dtype", "block", "t", "density"))


def run_cell(cell: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cell)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {**cell, "error": (res.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return f"n/a ({r['error'][:60]})"
    return f"{r['seconds']:.3f} ({r['sdpa_seconds'] / r['seconds']:.2f}x)"


def report(results: list[dict]) -> str:
    by = {key(r): r for r in results}
    from longattn.bench.cells import hardware
    from longattn.ops.block_sparse.native import bf16_supported, native_unavailable_reason

    lines = [
        "# CPU speed of the block-sparse operator",
        "",
        f"CPU: {hardware()['name']}; {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; native kernel: {native_unavailable_reason() or 'built'}"
        f"{', bf16 products (AVX512-BF16)' if bf16_supported() else ''}.",
        "",
        f"Shapes B={B} Hq={HQ} Hkv={HKV} D={D}; per-query-head random selections (sinks + diagonal + random "
        "blocks), query blocks of 16. Cells: seconds (speed-up over causal SDPA of the same dtype, timed "
        "alternately in the same process). FlexAttention: `torch.compile(flex_attention)` on the same "
        "BlockMask, steady time; its compile time is the last column.",
        "",
        "| dtype | block | tokens | density | SDPA s | native | gather | cpu | flex (compiled) | flex compile s "
        "| peak MiB native / SDPA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted({(r["dtype"], r["block"], r["t"], r["density"]) for r in results if r["mode"] == "prefill"},
                  key=lambda x: (x[0] != "fp32", x[3], x[1], x[2]))
    for dtype, block, t, dens in rows:
        cell = {o: by.get(key(dict(mode="prefill", op=o, dtype=dtype, block=block, t=t, density=dens)))
                for o in PREFILL_OPS + ("sdpa",)}
        ok = [c for c in cell.values() if c and "error" not in c]
        sdpa_s = min((c["sdpa_seconds"] for c in ok), default=float("nan"))
        exact = next((c["exact_density"] for c in ok), dens)
        flex = cell["flex"]
        comp = f"{flex['compile_seconds']:.1f}" if flex and "error" not in flex else "-"
        nat, sd = cell["native"], cell["sdpa"]
        peak = f"{nat['peak_mib']:.0f} / {sd['peak_mib']:.0f}" if nat and sd and "error" not in nat else "-"
        lines.append(f"| {dtype} | {block} | {t} | {exact:.3f} | {sdpa_s:.3f} | {fmt(cell['native'])} | "
                     f"{fmt(cell['gather'])} | {fmt(cell['cpu'])} | {fmt(flex)} | {comp} | {peak} |")
    lines += ["", "Decode: one query over the cache, per call (= per token per layer), median of 60; "
              "speed-up over SDPA decode of the same dtype.", "",
              "| dtype | cache | density | SDPA ms | native ms | gather ms |", "|---|---:|---:|---:|---:|---:|"]
    for dtype in DTYPES:
        for t in sorted({r["t"] for r in results if r["mode"] == "decode" and r["dtype"] == dtype}):
            c = {o: by.get(key(dict(mode="decode", op=o, dtype=dtype, block=16, t=t, density=0.1)))
                 for o in ("native", "gather")}
            ok = [x for x in c.values() if x and "error" not in x]
            sd = min((x["sdpa_seconds"] for x in ok), default=float("nan")) * 1e3
            ms = {o: (f"{x['seconds'] * 1e3:.3f} ({x['sdpa_seconds'] / x['seconds']:.2f}x)" if x and "error" not in x
                      else fmt(x)) for o, x in c.items()}
            exact = next((x["exact_density"] for x in ok), 0.1)
            lines.append(f"| {dtype} | {t} | {exact:.3f} | {sd:.3f} | {ms['native']} | {ms['gather']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4k-16k only (the full run adds 32k)")
    parser.add_argument("--out", type=Path, help="write the markdown here (and the raw cells to <out>.jsonl)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="ignore finished cells of an earlier run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    parser.add_argument("--e2e", action="store_true",
                        help="append the end-to-end table of benchmarks/cpu_e2e.py (dense, moba, streaming; "
                             "GrowingCache; 2k-16k with --quick, else to 32k; cells kept in cpu_e2e.jsonl beside --out)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    store = (args.out.with_suffix(".jsonl") if args.out else Path("cpu_speed.jsonl"))
    done = {}
    if store.exists() and args.fresh:
        store.unlink()  # the report reads only this run's cells; the file then holds only them too
    if store.exists():
        done = {key(r): r for r in map(json.loads, store.read_text().splitlines()) if "error" not in r}
    todo = cells(args.quick, args.repeats)
    todo += [{**c, "op": "sdpa", "repeats": 1} for c in todo if c["op"] == "native"]  # SDPA's own peak
    results = []
    for i, cell in enumerate(todo):
        if key(cell) in done:
            results.append(done[key(cell)])
            continue
        r = run_cell(cell, args.timeout)
        print(f"[{i + 1}/{len(todo)}] {key(cell)}: {fmt(r)}", file=sys.stderr, flush=True)
        results.append(r)
        with store.open("a") as f:
            f.write(json.dumps(r) + "\n")
    text = report(results)
    if args.e2e:
        import cpu_e2e

        lengths = [2048, 4096, 8192, 16384] + ([] if args.quick else [32768])
        rows = cpu_e2e.sweep(lengths, ["dense", "moba", "streaming"], "float32", 16,
                             store.with_name("cpu_e2e.jsonl"), "growing")
        text += ("\n\nEnd to end (benchmarks/cpu_e2e.py): the default model, float32, GrowingCache for every "
                 "method, one prompt per cell, each cell in its own process.\n\n" + cpu_e2e.table(rows) + "\n")
    print(text)
    if args.out:
        # Notes written under the marker (what the numbers mean, what limits a target) survive a rerun.
        if args.out.exists() and NOTES in (old := args.out.read_text()):
            text += "\n" + NOTES + old.split(NOTES, 1)[1]
        args.out.write_text(text)


if __name__ == "__main__":
    main()
