"""Context parallelism: 2 and 4 CPU processes (gloo) give a single process's logits, in prefill and decode.

Each spawn runs every case in one group (starting processes costs seconds). The worker writes what each rank
saw; the test compares it with the same method in this process on one GrowingCache, and the ranks with each
other. Skipped cleanly where processes cannot be spawned or gloo cannot start.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longattn
from longattn.bench.generate import greedy_generate
from longattn.hf.cache import GrowingCache
from longattn.hf.parallel import ShardedCache, shard_bounds
from longattn.ops.parallel import all_gather_cat, merge_across_ranks, merge_across_ranks_reference
from tests.conftest import tiny_model

LENGTH = 280  # prompt tokens: 17 blocks of 16 and a partial one, so shards differ in size (dense: 64-token blocks)
STEPS = 10  # decode steps after the prefill, over the block boundary at 288
# name -> (method, options); "full" budgets must equal dense, small ones the single process's selection.
CASES = {
    "dense": ("dense", {}),
    "moba-full": ("moba", {"block_size": 16, "top_k": 1 << 10, "window": 16}),
    "moba-small": ("moba", {"block_size": 16, "top_k": 2, "window": 16}),
    "moba-shared": ("moba", {"block_size": 16, "top_k": 1, "window": 16, "share_kv_heads": True}),
    "quest-small": ("quest", {"block_size": 16, "top_k": 2, "window": 16}),
    "quest-qbs32": ("quest", {"block_size": 16, "query_block_size": 32, "top_k": 2, "window": 0, "sink_tokens": 0}),
    "streaming": ("streaming", {"block_size": 16, "sink_tokens": 4, "window": 32}),
    "duo": ("duo", {"block_size": 16, "sink_tokens": 4, "window": 32, "retrieval_heads": ((0, 1), (1, 0))}),
}


def _model():
    return tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=128)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, LENGTH), generator=g), torch.randint(0, 256, (2, STEPS), generator=g)


def _run(model, ids, steps, cache, prefill) -> torch.Tensor:
    """Last-position logits ``[1 + STEPS, B, V]`` of the prefill and of each decode step."""
    logits = [prefill(cache)]
    for i in range(steps.shape[1]):
        out = model(input_ids=steps[:, i : i + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits)


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        results: dict = {}
        model = _model()
        ids, steps = _inputs()
        with torch.inference_mode():
            for name, (method, options) in CASES.items():
                with longattn.apply(model, longattn.get_method(method, **options), process_group=dist.group.WORLD) \
                        as session:
                    cache = session.new_cache()
                    got = _run(model, ids, steps, cache, lambda c: longattn.parallel_prefill(model, ids, c))
                    results[name] = {"logits": got, "held": cache.kv_bytes()[0], "density": session.stats.density}
            # Greedy generation, as the bench harness runs it: the session makes the sharded cache.
            with longattn.apply(model, longattn.get_method("moba", block_size=16, top_k=2, window=16),
                                process_group=dist.group.WORLD):
                results["greedy"] = greedy_generate(model, ids[:1], 8).tokens
            # The collectives against their references, on parts that differ per rank (one rank sees no key).
            g = torch.Generator().manual_seed(rank)
            out, lse = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, generator=g) * 4
            if rank == 1:
                lse[0, 0] = float("-inf")
                out[0, 0] = 0
            results["merge"] = merge_across_ranks(out, lse)
            results["merge_ref"] = merge_across_ranks_reference(out, lse)
            results["gathered"] = all_gather_cat(torch.full((1, rank + 1), float(rank)), 1)
            # What is refused is refused on every rank, before any collective.
            errors = {}
            for label, call in {
                "observer": lambda: longattn.apply(model, longattn.get_method("moba"), observer=lambda *a: None,
                                                   process_group=dist.group.WORLD),
                "razor": lambda: longattn.apply(model, longattn.get_method("razor", retrieval_heads=((0, 1),)),
                                                process_group=dist.group.WORLD),
                "short": lambda: _short_prompt(model, ids),
                "plain-forward": lambda: _plain_forward(model, ids),
            }.items():
                try:
                    call()
                except ValueError as err:
                    errors[label] = str(err)
            # A method that scores raw keys in decode fails on every rank (the last one says why), none waits.
            try:
                _raw_keys_decode(model, ids, steps)
            except (ValueError, RuntimeError) as err:
                errors["raw-keys"] = str(err)
            results["errors"] = errors
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _raw_keys_decode(model, ids, steps):
    method = longattn.get_method("blockmax", block_size=16, top_k=2, window=16)
    with longattn.apply(model, method, process_group=dist.group.WORLD) as session:
        cache = session.new_cache()
        longattn.parallel_prefill(model, ids, cache)
        model(input_ids=steps[:, :1], past_key_values=cache, use_cache=True)


def _short_prompt(model, ids):
    with longattn.apply(model, longattn.get_method("moba"), process_group=dist.group.WORLD) as session:
        longattn.parallel_prefill(model, ids[:, :20], session.new_cache())


def _plain_forward(model, ids):
    with longattn.apply(model, longattn.get_method("moba"), process_group=dist.group.WORLD):
        model(input_ids=ids)


def _spawn(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        try:
            mp.start_processes(_worker, args=(world, init, tmp), nprocs=world, join=True, start_method="spawn")
        except Exception as err:
            errors = sorted(Path(tmp).glob("*.err"))
            if errors:
                raise AssertionError(errors[0].read_text()) from err
            pytest.skip(f"cannot spawn {world} processes with gloo here: {err}")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """The same cases in this process, on one GrowingCache."""
    model = _model()
    ids, steps = _inputs()
    ref = {}
    with torch.inference_mode():
        for name, (method, options) in CASES.items():
            with longattn.apply(model, longattn.get_method(method, **options), kv_cache="full") as session:
                def prefill(cache):
                    return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()

                ref[name] = {"logits": _run(model, ids, steps, GrowingCache(), prefill), "density": session.stats.density}
        with longattn.apply(model, longattn.get_method("moba", block_size=16, top_k=2, window=16)):
            ref["greedy"] = greedy_generate(model, ids[:1], 8, prefill_chunk=None).tokens
        cache = GrowingCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        ref["held"] = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    return ref


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request) -> tuple[int, list[dict]]:
    return request.param, _spawn(request.param)


def test_logits_equal_one_process(ranks, reference):
    world, results = ranks
    for name in CASES:
        for rank, res in enumerate(results):
            torch.testing.assert_close(res[name]["logits"], reference[name]["logits"], rtol=0, atol=1e-5,
                                       msg=lambda m: f"{name}, rank {rank} of {world}: {m}")
            assert res[name]["logits"].equal(results[-1][name]["logits"]), "every rank ends with the same logits"


def test_small_budgets_are_sparse_and_count_the_same_pairs(ranks, reference):
    _, results = ranks
    for name in ("moba-small", "quest-small", "streaming"):
        density = reference[name]["density"]
        assert density < 0.9, f"{name} must really be sparse here"
        for res in results:
            assert res[name]["density"] == pytest.approx(density, rel=1e-6)
    dense = reference["dense"]["logits"]
    assert (reference["moba-small"]["logits"] - dense).abs().max() > 1e-3, "a small budget must differ from dense"


def test_greedy_generation_matches(ranks, reference):
    _, results = ranks
    for res in results:
        assert res["greedy"].tolist() == reference["greedy"].tolist()


def test_kv_per_rank_falls_as_one_over_n(ranks, reference):
    world, results = ranks
    tokens = LENGTH + STEPS
    edges = shard_bounds(LENGTH, world, 16)
    per_token = reference["held"] / LENGTH
    for rank, res in enumerate(results):
        own = edges[rank + 1] - edges[rank] + (STEPS if rank == world - 1 else 0)
        assert res["moba-small"]["held"] == pytest.approx(own * per_token)
    assert sum(r["moba-small"]["held"] for r in results) == pytest.approx(tokens * per_token)
    assert max(r["moba-small"]["held"] for r in results) <= (LENGTH / world + 16 + STEPS) * per_token


def test_collectives_equal_their_references(ranks):
    world, results = ranks
    for res in results:
        torch.testing.assert_close(res["merge"][0], res["merge_ref"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["merge"][1], res["merge_ref"][1], rtol=1e-6, atol=1e-6)
        assert res["gathered"].tolist() == [[float(r) for r in range(world) for _ in range(r + 1)]]


def test_refusals_name_what_is_unsupported(ranks):
    _, results = ranks
    for res in results:
        errors = res["errors"]
        assert "observer" in errors["observer"]
        assert "adjusts outputs" in errors["razor"]
        assert "cannot be sharded" in errors["short"]
        assert "ShardedCache" in errors["plain-forward"]
    assert "scores raw keys after the prefill" in results[-1]["errors"]["raw-keys"]
    for res in results[:-1]:
        assert "the last rank of the group could not select" in res["errors"]["raw-keys"]


def test_shard_bounds():
    assert shard_bounds(200, 2, 16) == [0, 96, 200]
    assert shard_bounds(64, 4, 16) == [0, 16, 32, 48, 64]
    edges = shard_bounds(32768, 4, 64)
    assert edges == [0, 8192, 16384, 24576, 32768]
    with pytest.raises(ValueError, match="at least 64 tokens"):
        shard_bounds(63, 4, 16)
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(100, 0, 16)


def test_a_sharded_cache_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is active in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ShardedCache(_model().config, None, 16)
