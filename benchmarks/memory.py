"""KV memory measured as resident memory: duo / streaming on a head-aware cache against the same method on
transformers' DynamicCache and against dense SDPA, on the default model.

    python benchmarks/memory.py [--lengths 16k,32k] [--cells dense,duo/dynamic,duo/head_aware,streaming/head_aware]
                                [--share 0.25] [--chunk 0] [--decode 16] [--out docs/results/memory/results.jsonl]
    python benchmarks/memory.py --report docs/results/memory/results.jsonl

Each cell runs in a fresh process (an allocator keeps what an earlier cell freed, so cells in one process
would measure each other): load the model, prefill one prompt of the given length (in chunks of --chunk
tokens, 0 = one pass; logits of the last position only), then --decode greedy tokens. Recorded per cell:
peak RSS (sampled every 5 ms) above the RSS after loading, the RSS once the prompt is read, the KV bytes
the cache holds, prefill seconds and the median decode step. A cell already in --out is skipped, so a rerun
resumes. The CPU model and thread count are in every line; ratios are between cells of one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CELLS = ("dense", "dense/growing", "duo/dynamic", "duo/head_aware", "streaming/head_aware")
PROFILE = Path("docs/results/heads/smollm2_profile.json")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_cell(cell: str, length: int, share: float, chunk: int, decode: int, seed: int) -> dict:
    import torch
    from transformers import DynamicCache

    import longattn
    from longattn.bench.memory import PeakMemory, rss_bytes
    from longattn.bench.tasks import niah_single
    from longattn.hf.cache import kv_bytes

    model, tok = longattn.load_model()
    text = niah_single.make(tok, length, 0.5, seed).prompt
    ids = tok(text, return_tensors="pt").input_ids[:, :length]
    while ids.shape[1] < length:  # a prompt a few tokens short of the length: repeat its start
        ids = torch.cat([ids, ids[:, : length - ids.shape[1]]], dim=1)
    common = dict(sink_tokens=4, window=256, block_size=64)
    name, _, cache_kind = cell.partition("/")
    if name == "dense":
        method = longattn.get_method("dense")
    elif name == "duo":
        method = longattn.get_method("duo", profile=longattn.HeadProfile.load(PROFILE), retrieval_share=share, **common)
    else:
        method = longattn.get_method(name, **common)
    kv_cache = "head_aware" if cache_kind == "head_aware" else "full"
    gc.collect()
    with torch.inference_mode(), longattn.apply(model, method, kv_cache=kv_cache) as session:
        if cache_kind == "head_aware":
            cache = session.new_cache()
        elif cache_kind == "growing":
            cache = longattn.GrowingCache()
        else:
            cache = DynamicCache(config=model.config)
        start_rss = rss_bytes()
        with PeakMemory("cpu") as mem:
            t0 = time.perf_counter()
            step = chunk or length
            for first in range(0, length, step):
                out = model(ids[:, first : first + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill_s = time.perf_counter() - t0
            read_rss = rss_bytes()
            token = out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(decode):
                t1 = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - t1)
                token = out.logits[:, -1:].argmax(-1)
        held, allocated = kv_bytes(cache)
        density = session.prefill_stats.density
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    # What a full cache holds for the same tokens: keys and values of every layer and KV head.
    dense_kv = 2 * config.num_hidden_layers * config.num_key_value_heads * (length + decode) * head_dim * itemsize
    return {
        "cell": cell, "length": length, "share": share if name == "duo" else None, "chunk": chunk, "decode": decode,
        "prefill_s": prefill_s, "decode_s": statistics.median(steps) if steps else None,
        "peak_rss_above_start": mem.peak_bytes - start_rss, "rss_after_prompt_above_start": read_rss - start_rss,
        "start_rss": start_rss, "peak_rss": mem.peak_bytes, "kv_held_bytes": held, "kv_allocated_bytes": allocated,
        "dense_kv_bytes": dense_kv, "density": density, "dtype": str(model.dtype),
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def key(record: dict) -> tuple:
    return (record["cell"], record["length"], record["share"], record["chunk"], record["decode"])


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    gib = 2 ** 30
    lines = [f"{rows[0]['cpu']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}, {rows[0]['dtype']}" if rows else "",
             "", "| tokens | cell | chunk | KV held (GiB) | KV vs dense | peak RSS above start (GiB) | peak RSS saved vs "
             "same method, full cache (GiB) | RSS once read (GiB) | prefill s | decode ms/token | decode vs full cache |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(r["cell"], r["length"], r["chunk"]): r for r in rows}
    for r in rows:
        name, _, kind = r["cell"].partition("/")
        full = by_key.get((f"{name}/dynamic", r["length"], r["chunk"])) if kind == "head_aware" else None
        if full is None and kind == "head_aware":
            full = by_key.get(("dense", r["length"], r["chunk"]))
        saved = "" if full is None else f"{(full['peak_rss_above_start'] - r['peak_rss_above_start']) / gib:.2f}"
        speed = "" if full is None or not r["decode_s"] else f"{full['decode_s'] / r['decode_s']:.2f}x"
        decode = "" if not r["decode_s"] else f"{r['decode_s'] * 1e3:.0f}"
        lines.append(
            f"| {r['length']} | {r['cell']} | {r['chunk'] or 'one pass'} | {r['kv_held_bytes'] / gib:.3f} | "
            f"{r['kv_held_bytes'] / r['dense_kv_bytes']:.1%} | {r['peak_rss_above_start'] / gib:.2f} | {saved} | "
            f"{r['rss_after_prompt_above_start'] / gib:.2f} | {r['prefill_s']:.1f} | {decode} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16k,32k")
    parser.add_argument("--cells", default="dense,duo/dynamic,duo/head_aware,streaming/head_aware")
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--chunk", type=int, default=0, help="prefill chunk in tokens (0: one pass)")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/memory/results.jsonl"))
    parser.add_argument("--report", type=Path, help="print the table of a results file and exit")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell in this process
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.length, args.share, args.chunk, args.decode, args.seed)))
        return
    from longattn.bench.runner import parse_lengths

    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        parser.error(f"--cells: unknown {unknown}; choose from {', '.join(CELLS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {key(json.loads(line)) for line in args.out.read_text().splitlines() if line.strip()}
    for length in parse_lengths(args.lengths):
        for cell in cells:
            share = args.share if cell.startswith("duo") else None
            if (cell, length, share, args.chunk, args.decode) in done:
                print(f"skip {cell} at {length} (in {args.out})", flush=True)
                continue
            cmd = [sys.executable, __file__, "--cell", cell, "--length", str(length), "--share", str(args.share),
                   "--chunk", str(args.chunk), "--decode", str(args.decode), "--seed", str(args.seed)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{cell} at {length} failed:\n{result.stderr[-3000:]}", flush=True)
                continue
            record = json.loads(result.stdout.strip().splitlines()[-1])
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{cell} at {length}: prefill {record['prefill_s']:.1f} s, peak +"
                  f"{record['peak_rss_above_start'] / 2**30:.2f} GiB, KV {record['kv_held_bytes'] / 2**30:.3f} GiB",
                  flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
