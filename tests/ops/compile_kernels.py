"""Compile (not run) every Triton kernel for CUDA targets, with the launch settings the wrappers use.

Run as a script in a process without ``TRITON_INTERPRET`` (the test does that): in the interpreter, kernels
accept Python that a real compile rejects (plain globals, some dtype mixes), so this is the CPU-side check
that the kernels build for a GPU at all, and fit its shared memory. Prints one line per configuration.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longattn.ops.block_sparse import triton_kernel as attn
from longattn.ops.block_topk import triton_kernel as topk

SHARED_LIMIT = 227 * 1024  # H100 / H200 per-block shared memory


def build(fn, ptrs: dict[str, str], consts: dict, target: GPUTarget, floats: tuple[str, ...] = (), **options):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=target, options=options)


def main(caps: list[int]) -> int:
    failures = 0
    for cap in caps:
        target = GPUTarget("cuda", cap, 32)
        configs = []
        for dtype, d, bs, rows in (("fp16", 128, 64, 64), ("bf16", 128, 16, 256), ("bf16", 64, 128, 16),
                                   ("bf16", 128, 16, 4), ("fp32", 64, 16, 64), ("fp16", 256, 32, 64)):
            ieee = dtype == "fp32"
            block_d = max(16, triton.next_power_of_2(d))
            tiles = attn.tile_config(rows, block_d, ieee)
            ptrs = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "LSE": "*fp32",
                    "IDX": "*i32", "CNT": "*i32", "KVALID": "*u8"}
            consts = dict(HPS=4, SPK=1, QBS=max(1, rows // 4), BS=bs, D=d, BLOCK_M=tiles["BLOCK_M"],
                          BLOCK_N=tiles["BLOCK_N"], BLOCK_D=block_d, CAUSAL=True, HAS_KVALID=True, IEEE=ieee)
            opts = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
            configs.append((f"attention {dtype} D{d} bs{bs} rows{rows}", attn._sparse_attn_fwd, ptrs, consts,
                            ("sm_scale_log2",), opts))
        configs.append(("merge splits", attn._merge_splits, {"PO": "*fp32", "PLSE": "*fp32", "O": "*bf16", "LSE": "*fp32"},
                        dict(SPLITS=16, D=128, BLOCK_D=128), (), {}))
        for kind, d, kp in (("mean", 128, 32), ("minmax", 128, 32), ("minmax", 128, 128), ("mean", 64, 1)):
            block_n = max(64, kp)
            ptrs = {"Q": "*bf16", "S": "*fp32", "KEYS": "*i64", "LIMIT": "*i32", "SINK_LO": "*i32",
                    "SINK_HI": "*i32", "HAS_KEY": "*u8"}
            consts = dict(G=4, QBS=16, D=d, KP=kp, SPLITS=1, BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=d,
                          MINMAX=kind == "minmax", HAS_MASK=True)
            stages = topk.topk_num_stages(block_n, d, kind)
            configs.append((f"block top-k {kind} D{d} k{kp}", topk._block_topk_kernel, ptrs, consts, (),
                            dict(num_stages=stages)))
        for name, fn, ptrs, consts, floats, opts in configs:
            try:
                kernel = build(fn, ptrs, consts, target, floats, **opts)
                shared = kernel.metadata.shared
                ok = shared <= SHARED_LIMIT
                print(f"sm_{cap} {name}: {'ok' if ok else 'TOO MUCH SHARED MEMORY'} ({shared} B shared)")
                failures += not ok
            except Exception as exc:  # noqa: BLE001 - report every configuration, then fail
                print(f"sm_{cap} {name}: FAILED {type(exc).__name__}: {str(exc)[-400:]}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [90, 80]))
