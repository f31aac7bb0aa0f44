"""Context parallelism on CPU: prefill time, decode time and memory per rank for 1, 2 and 4 ranks (gloo), and
whether N ranks give a single process's greedy tokens on the harness's passkey prompts.

    python benchmarks/distributed.py [--length 32k] [--ranks 1,2,4] [--methods moba,dense] [--decode 16]
                                     [--out docs/results/distributed/results.jsonl]
    python benchmarks/distributed.py --threads 1 --ranks 1,2 --methods moba      # a core per rank
    python benchmarks/distributed.py --passkey 4k --prompts 10 --ranks 2 --methods moba
    python benchmarks/distributed.py --report docs/results/distributed/results.jsonl

Each cell is one ``torchrun --standalone --nproc-per-node N`` launch of this file (fresh processes: an allocator
keeps what an earlier cell freed): every rank loads the default model, reads the same prompt through
``longattn.apply(model, method, process_group=WORLD)`` and ``bench.greedy_generate``, and reports its peak RSS
(sampled every 5 ms) above its RSS after loading, the KV bytes its shard holds, and the prefill and decode times.
Threads per rank: the machine's cores divided by the ranks (at least 1), so 4 ranks on 2 cores share them.
A cell already in --out is skipped (a rerun resumes). The CPU model is in every line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _prompt(tok, task: str, length: int, depth: float, seed: int):
    import torch

    from longattn.bench.tasks import TASKS

    example = TASKS[task].make(tok, length, depth, seed)
    ids = tok(example.prompt, return_tensors="pt").input_ids
    return example, ids if ids.shape[1] >= 64 else torch.cat([ids] * 2, 1)


def worker(args: argparse.Namespace) -> None:
    """One rank of one cell (run by torchrun); rank 0 prints the cell's JSON line."""
    import torch
    import torch.distributed as dist

    import longattn
    from longattn.bench.generate import greedy_generate
    from longattn.bench.memory import PeakMemory, rss_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo")
    model, tok = longattn.load_model()
    method = longattn.get_method(args.cell_method)
    group = dist.group.WORLD if args.single == 0 else None
    if args.passkey:
        from longattn.bench.tasks import TASKS

        rows = []
        for length in [int(x) for x in args.passkey.split(",")]:
            for i in range(args.prompts):
                depth, seed = [0.1, 0.3, 0.5, 0.7, 0.9][i % 5], i // 5
                example, ids = _prompt(tok, "passkey", length, depth, seed)
                with torch.inference_mode(), longattn.apply(model, method, process_group=group):
                    out = greedy_generate(model, ids, TASKS["passkey"].MAX_NEW_TOKENS, tok.eos_token_id)
                text = tok.decode(out.tokens, skip_special_tokens=True)
                rows.append({"length": length, "depth": depth, "seed": seed, "tokens": out.tokens.tolist(),
                             "score": TASKS["passkey"].score(example, text), "prefill_s": out.prefill_s})
        if rank == 0:
            print("RESULT " + json.dumps({"mode": "passkey", "method": args.cell_method, "ranks": world,
                                          "single": bool(args.single), "rows": rows, "cpu": cpu_model(),
                                          "threads": torch.get_num_threads()}), flush=True)
        dist.destroy_process_group()
        return
    _, ids = _prompt(tok, "niah_single", args.length + 64, 0.5, 0)
    ids = ids[:, : args.length]
    while ids.shape[1] < args.length:
        ids = torch.cat([ids, ids[:, : args.length - ids.shape[1]]], 1)
    start_rss = rss_bytes()
    with torch.inference_mode(), longattn.apply(model, method, process_group=group) as session:
        cache = session.new_cache() if group is not None else longattn.GrowingCache()
        dist.barrier()
        with PeakMemory("cpu") as mem:
            t0 = time.perf_counter()
            out = greedy_generate(model, ids, args.decode + 1, past_key_values=cache, prefill_chunk=None)
            wall = time.perf_counter() - t0
        held = cache.kv_bytes()[0] if hasattr(cache, "kv_bytes") else None
        if held is None:
            from longattn.hf.cache import kv_bytes

            held = kv_bytes(cache)[0]
        density = session.prefill_stats.density
    mine = {"rank": rank, "peak_rss_above_start": mem.peak_bytes - start_rss, "start_rss": start_rss,
            "kv_held_bytes": held, "prefill_s": out.prefill_s, "decode_s": out.decode_s / max(1, args.decode),
            "wall_s": wall}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print("RESULT " + json.dumps({
            "mode": "scaling", "method": args.cell_method, "ranks": world, "length": args.length,
            "decode": args.decode, "density": density, "per_rank": everyone, "tokens": out.tokens.tolist(),
            "threads_forced": args.threads,
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


def key(r: dict) -> tuple:
    if r["mode"] == "passkey":
        return ("passkey", r["method"], r["ranks"], r["single"], tuple(sorted({x["length"] for x in r["rows"]})),
                len(r["rows"]))
    return ("scaling", r["method"], r["ranks"], r["length"], r["decode"], r.get("threads_forced", 0))


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    gib = 2 ** 30
    scaling = [r for r in rows if r["mode"] == "scaling"]
    out = []
    if scaling:
        out += [f"{scaling[0]['cpu']}, torch {scaling[0]['torch']}, float32, gloo; threads per rank = cores / ranks", "",
                "| method | tokens | ranks | threads per rank | prefill s (slowest rank) | prefill vs 1 rank | decode ms/token | KV per rank "
                "(GiB, max) | KV per rank vs 1 rank | peak RSS above start per rank (GiB, max) | same tokens as 1 rank |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        base = {(r["method"], r["length"], r.get("threads_forced", 0)): r for r in scaling if r["ranks"] == 1}
        for r in sorted(scaling, key=lambda r: (r["method"], r.get("threads_forced", 0), r["length"], r["ranks"])):
            b = base.get((r["method"], r["length"], r.get("threads_forced", 0)))
            pre = max(p["prefill_s"] for p in r["per_rank"])
            kv = max(p["kv_held_bytes"] for p in r["per_rank"])
            peak = max(p["peak_rss_above_start"] for p in r["per_rank"])
            dec = max(p["decode_s"] for p in r["per_rank"])
            b_pre = None if b is None else max(p["prefill_s"] for p in b["per_rank"])
            b_kv = None if b is None else max(p["kv_held_bytes"] for p in b["per_rank"])
            out.append(
                f"| {r['method']} | {r['length']} | {r['ranks']} | {r['threads']} | {pre:.1f} | "
                f"{'' if b_pre is None else f'{b_pre / pre:.2f}x'} | {dec * 1e3:.0f} | {kv / gib:.3f} | "
                f"{'' if b_kv is None else f'{kv / b_kv:.2f}'} | {peak / gib:.2f} | "
                f"{'' if b is None else ('yes' if b['tokens'] == r['tokens'] else 'no')} |")
    passkey = [r for r in rows if r["mode"] == "passkey"]
    if passkey:
        out += ["", "| method | ranks | prompts | passkey score | same greedy tokens as one process |", "|---|---:|---:|---:|---|"]
        single = {r["method"]: r for r in passkey if r["single"]}
        for r in passkey:
            ref = single.get(r["method"])
            same = "" if ref is None or r["single"] else \
                f"{sum(a['tokens'] == b['tokens'] for a, b in zip(r['rows'], ref['rows']))}/{len(r['rows'])}"
            score = sum(x["score"] for x in r["rows"]) / len(r["rows"])
            out.append(f"| {r['method']} | {'1 (no process group)' if r['single'] else r['ranks']} | {len(r['rows'])} | "
                       f"{score:.2f} | {same} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", default="32k")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--methods", default="moba,dense")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per rank (0: the cores divided by the ranks); 1 with ranks <= cores gives "
                             "each rank a core of its own, the scaling a machine per rank would see")
    parser.add_argument("--passkey", help="lengths of a passkey check instead of the scaling cells, e.g. 4k")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/results/distributed/results.jsonl"))
    parser.add_argument("--report", type=Path, help="print the tables of a results file and exit")
    parser.add_argument("--cell-method", help=argparse.SUPPRESS)  # internal: one rank of one cell
    parser.add_argument("--single", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    from longattn.bench.runner import parse_lengths

    passkey = ",".join(str(n) for n in parse_lengths(args.passkey)) if args.passkey else None
    if args.cell_method:
        args.length = parse_lengths(args.length)[0]
        args.passkey = passkey
        worker(args)
        return
    length = parse_lengths(args.length)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {key(json.loads(x)) for x in args.out.read_text().splitlines() if x.strip()} if args.out.exists() else set()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for method in args.methods.split(","):
        cells = [(int(n), 0) for n in args.ranks.split(",")]
        if passkey:
            cells = [(1, 1)] + cells  # the single-process reference first
        for ranks, single in cells:
            if passkey:
                k = ("passkey", method, ranks, bool(single), tuple(int(x) for x in passkey.split(",")),
                     args.prompts * len(passkey.split(",")))
            else:
                k = ("scaling", method, ranks, length, args.decode, args.threads)
            if k in done:
                print(f"skip {k}", flush=True)
                continue
            cmd = [torchrun, "--standalone", f"--nproc-per-node={ranks}", str(HERE), "--cell-method", method,
                   "--length", str(length), "--decode", str(args.decode), "--single", str(single),
                   "--prompts", str(args.prompts), "--threads", str(args.threads)] + (["--passkey", passkey] if passkey else [])
            t0 = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                print(f"{k} failed:\n{result.stderr[-3000:]}", flush=True)
                continue
            record = json.loads(lines[-1][len("RESULT "):])
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{k}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
