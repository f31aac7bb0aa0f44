"""Gemma 3 270M (hybrid: 15 sliding-window layers of 512 tokens, 3 global layers) on CPU: speed and accuracy.

    python benchmarks/models_gemma.py [--lengths 4k,8k,16k,32k] [--methods sdpa,dense,moba,streaming]
                                      [--prompts 10] [--accuracy-lengths 4k,8k] [--out docs/results/models.jsonl]

Needs `make install-gemma`. ``sdpa`` is transformers' own attention (its sliding layers masked over the whole
sequence), ``dense`` is longattn with every full-attention key kept (sliding layers at window cost), then the
sparse methods at their defaults (they select on the 3 global layers only). Speed cells: one ``niah_single``
prompt (repeated filler), the whole prefill (``logits_to_keep=1``) and 16 greedy decode steps on
``GrowingCache``. Accuracy cells: ``--prompts`` natural-text needle prompts (depths spread, seeds varied),
greedy answers scored by the task. Every cell runs in its own subprocess and appends one JSON line to
``--out``; a rerun skips the cells already there (an accuracy cell with another ``--prompts`` is a new cell).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("docs/results/models.jsonl")


def _method(name: str):
    import longattn

    return None if name == "sdpa" else longattn.get_method(name)


def _applied(model, method):
    """``longattn.apply(model, method)``, or nothing for transformers' own attention (``sdpa``)."""
    import longattn

    return contextlib.nullcontext() if method is None else longattn.apply(model, method)


def speed_cell(name: str, length: int) -> dict:
    import torch

    import longattn
    from longattn.bench.cells import hardware
    from longattn.bench.tasks import niah_single

    model, tok = longattn.load_model("gemma-3-270m")
    ids = tok(niah_single.make(tok, length, 0.5, 0, haystack="repeat").prompt, return_tensors="pt").input_ids
    method = _method(name)
    density = None
    with torch.inference_mode(), _applied(model, method) as session:
        cache = longattn.GrowingCache()
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(16):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - start) / 16
        if session is not None:
            density = session.prefill_stats.density
    return {"kind": "speed", "method": name, "requested": length, "length": int(ids.shape[1]),
            "prefill_s": prefill, "decode_ms": decode * 1000, "density": density, "cpu": hardware()["name"],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def accuracy_cell(name: str, length: int, prompts: int) -> dict:
    import torch

    import longattn
    from longattn.bench.generate import greedy_generate
    from longattn.bench.tasks import niah_single

    model, tok = longattn.load_model("gemma-3-270m")
    method = _method(name)
    correct, answers = 0, []
    for i in range(prompts):
        example = niah_single.make(tok, length, (i + 0.5) / prompts, 100 + i, haystack="natural")
        ids = tok(example.prompt, return_tensors="pt").input_ids
        with _applied(model, method):
            result = greedy_generate(model, ids, 12, eos_token_id=tok.eos_token_id)
        text = tok.decode(result.tokens, skip_special_tokens=True)
        ok = bool(niah_single.score(example, text))
        correct += ok
        answers.append(text[:40])
    return {"kind": "accuracy", "method": name, "requested": length, "prompts": prompts, "correct": correct,
            "answers": answers, "torch": torch.__version__}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cell":
        kind, name, length = sys.argv[2], sys.argv[3], int(sys.argv[4])
        row = speed_cell(name, length) if kind == "speed" else accuracy_cell(name, length, int(sys.argv[5]))
        print(json.dumps(row))
        return
    from longattn.bench.runner import parse_lengths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4k,8k,16k,32k")
    parser.add_argument("--methods", default="sdpa,dense,moba,streaming")
    parser.add_argument("--accuracy-lengths", default="4k,8k")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {(r["kind"], r["method"], r["requested"], r.get("prompts", 0)) for r in rows}
    cells = [("speed", m, n, 0) for n in parse_lengths(args.lengths) for m in args.methods.split(",")]
    cells += [("accuracy", m, n, args.prompts) for n in parse_lengths(args.accuracy_lengths)
              for m in args.methods.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for kind, name, length, prompts in cells:
        if (kind, name, length, prompts) in done:
            continue
        print(f"# {kind} {name} @ {length}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--cell", kind, name, str(length), str(prompts)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-1500:], file=sys.stderr)
            continue
        with args.out.open("a") as f:
            f.write(proc.stdout.strip().splitlines()[-1] + "\n")


if __name__ == "__main__":
    main()
