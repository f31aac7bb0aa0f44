"""End to end on the default model: prefill, decode and peak memory of dense and sparse methods, CPU.

    python benchmarks/cpu_e2e.py [--lengths 2k,4k,8k,16k,32k] [--methods dense,moba,streaming] [--dtype float32]
                                 [--decode 16] [--cache growing] [--out docs/results/cpu_e2e.jsonl]

Every (method, length) runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own, and appends one
JSON line to ``--out``; a rerun skips the cells already there (a 32k dense prefill takes minutes on 2 cores).
Each cell: one ``niah_single`` prompt (repeated filler, depth 0.5), the whole 30-layer prefill
(``logits_to_keep=1``), then ``--decode`` greedy steps; the time inside ``Method.select`` is measured too, as a
share of the time inside the attention calls. A method named ``q:<config>`` is a config of ``benchmarks/quality.py`` at its ~10% budget for the
length (exact decode scores), e.g. ``q:blockmax+compensate``; the time inside ``adjust_output`` (compensation)
is measured as a share of attention too. ``duo`` and ``razor`` read the default model's published head profile
(``docs/results/heads/smollm2_profile.json``) at ``retrieval_share=0.25``. ``--cache``: the KV cache every method (dense included) runs on,
``growing`` (``longattn.GrowingCache``, appends in place) or ``dynamic`` (transformers' ``DynamicCache``, which
copies the cache per decoded token; lines without a "cache" field were measured on it). Ratios are against
dense of the same length, dtype and cache, same file. ``benchmarks/cpu_speed.py --e2e`` runs it after the
operator cells and appends its table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("docs/results/cpu_e2e.jsonl")


def run_cell(method_name: str, length: int, dtype_name: str, decode: int, cache_name: str) -> dict:
    """Measure one cell in this process (called in the subprocess)."""
    import torch

    import longattn
    from longattn.bench.cells import hardware
    from longattn.bench.tasks import niah_single

    dtype = getattr(torch, dtype_name)
    model, tok = longattn.load_model(dtype=dtype)
    ids = tok(niah_single.make(tok, length, 0.5, 0, haystack="repeat").prompt, return_tensors="pt").input_ids
    if method_name.startswith("q:"):  # a config of the quality sweep, at its ~10% budget for this length
        sys.path.insert(0, str(Path(__file__).parent))
        from quality import configs

        method = configs(length, decode_rank=None)[method_name[2:]]()
    elif method_name in ("duo", "razor"):
        # No default profile exists: the default model's published one, at DuoAttention's 25% of KV heads.
        profile = longattn.HeadProfile.load(Path(__file__).parents[1] / "docs/results/heads/smollm2_profile.json")
        method = longattn.get_method(method_name, profile=profile, retrieval_share=0.25)
    else:
        method = longattn.get_method(method_name)
    timing = {"select": 0.0, "attend": 0.0, "adjust": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing[key] += time.perf_counter() - start
        return wrapper

    # Instance attributes on our own objects: the session calls them, transformers is untouched.
    method.select = timed(method.select, "select")  # type: ignore[method-assign]
    method.adjust_output = timed(method.adjust_output, "adjust")  # type: ignore[method-assign]
    with torch.inference_mode(), longattn.apply(model, method) as session:
        session.attend = timed(session.attend, "attend")  # type: ignore[method-assign]
        start = time.perf_counter()
        cache = longattn.GrowingCache() if cache_name == "growing" else None
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        share = timing["select"] / timing["attend"] if timing["attend"] else None
        adjust_share = timing["adjust"] / timing["attend"] if timing["attend"] else None
        attend_prefill = timing["attend"]
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
    return {
        "method": method_name, "length": int(ids.shape[1]), "requested": length, "dtype": dtype_name, "cache": cache_name,
        "prefill_s": prefill, "attention_prefill_s": attend_prefill, "select_share": share,
        "adjust_share": adjust_share,
        "decode_ms": decode_s / max(1, decode) * 1000, "density": session.prefill_stats.density,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu": hardware()["name"], "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def sweep(lengths: list[int], methods: list[str], dtype: str, decode: int, out: Path, cache: str) -> list[dict]:
    """Run the missing cells (each in a subprocess) and return every line of ``out`` for these settings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["requested"], r["dtype"], r.get("cache", "dynamic")) for r in _lines(out)}
    for length in lengths:
        for name in methods:
            if (name, length, dtype, cache) in done:
                continue
            print(f"# running {name} @ {length} ({dtype})", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--cell", name, str(length), dtype, str(decode), cache],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            with out.open("a") as f:
                f.write(proc.stdout.strip().splitlines()[-1] + "\n")
    return [r for r in _lines(out) if r["dtype"] == dtype and r["requested"] in lengths and r["method"] in methods
            and r.get("cache", "dynamic") == cache]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(rows: list[dict]) -> str:
    """Markdown: one row per cell, with the ratios to dense of the same length (> 1: faster / smaller)."""
    dense = {r["requested"]: r for r in rows if r["method"] == "dense"}
    out = ["| tokens | method | density | prefill s | vs dense | decode ms/token | vs dense | peak RSS MiB | dense / this "
           "| select share of attention | compensation share |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["requested"], r["method"] != "dense", r["method"])):
        d = dense.get(r["requested"])
        ratios = [f"{d[key] / r[key]:.2f}x" if d else "—" for key in ("prefill_s", "decode_ms", "peak_rss_mib")]
        share = "—" if r["select_share"] is None else f"{r['select_share']:.0%}"
        adjust = "—" if not r.get("adjust_share") else f"{r['adjust_share']:.0%}"
        out.append(f"| {r['length']} | {r['method']} | {r['density']:.3f} | {r['prefill_s']:.2f} | {ratios[0]} | "
                   f"{r['decode_ms']:.1f} | {ratios[1]} | {r['peak_rss_mib']:.0f} | {ratios[2]} | {share} | {adjust} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cell":
        name, length, dtype, decode, cache = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
        print(json.dumps(run_cell(name, length, dtype, decode, cache)))
        return
    from longattn.bench.cells import hardware
    from longattn.bench.runner import parse_lengths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2k,4k,8k,16k,32k")
    parser.add_argument("--methods", default="dense,moba,streaming")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--cache", default="growing", choices=["growing", "dynamic"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = sweep(parse_lengths(args.lengths), args.methods.split(","), args.dtype, args.decode, args.out, args.cache)
    print(f"# end to end, default model, {args.dtype}, {args.cache} cache: {hardware()['name']}, torch threads as in "
          "each subprocess")
    print(table(rows))


if __name__ == "__main__":
    main()
