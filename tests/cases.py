"""Every method with configs from easy to hard, for the parametrised tests.

`full` overrides give the method a budget that covers every block: its output must then equal dense
attention. `small` is the case's own config, a budget far below the test length: it must differ from dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longattn.methods import Method, MoBA


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    full: dict[str, Any] = field(default_factory=dict)
    sparse: bool = True  # False for dense, which has no budget to shrink
    causal_selection: bool = True  # False where a query block's *choice* of blocks may depend on later tokens
    sparse_prefill: bool = True  # False for eviction (snapkv): prefill is dense, decode reads what was kept

    @property
    def id(self) -> str:
        return self.name + "".join(f"-{k}{v.name if isinstance(v, Method) else v}" for k, v in self.config.items())


CASES = [
    Case("dense", {}, sparse=False),
    Case("dense", {"use_sdpa": False}, sparse=False),
    Case("dense", {"block_size": 16, "query_block_size": 32, "use_sdpa": False}, sparse=False),
    Case("streaming", {"block_size": 16, "sink_tokens": 4, "window": 16}, full={"window": 1 << 20}),
    Case("streaming", {"block_size": 32, "sink_tokens": 64, "window": 0}, full={"window": 1 << 20}),
    Case("moba", {"block_size": 16, "top_k": 2, "window": 16}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 16, "top_k": 1, "window": 0, "sink_tokens": 0}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 32, "query_block_size": 16, "top_k": 1, "window": 32}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 16, "top_k": 2, "window": 16, "share_kv_heads": True}, full={"top_k": 1 << 10}),
    # The quality options of every scored method (methods/topk.py), alone and combined.
    Case("moba", {"block_size": 16, "top_k": 2, "window": 16, "compensate": True}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 16, "top_k": 4, "window": 16, "top_p": 0.5}, full={"top_k": 1 << 10, "top_p": 1.0}),
    Case("moba", {"block_size": 16, "top_k": 2, "window": 16, "exact_last": True}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 16, "top_k": 3, "window": 16, "exact_last": True, "compensate": True, "top_p": 0.9},
         full={"top_k": 1 << 10, "top_p": 1.0}),
    Case("quest", {"block_size": 16, "top_k": 2, "window": 16, "exact_last": True, "share_kv_heads": True},
         full={"top_k": 1 << 10}),
    Case("longheads", {"block_size": 16, "top_k": 1, "window": 0, "sink_tokens": 0, "compensate": True,
                       "top_p": 0.7}, full={"top_k": 1 << 10, "top_p": 1.0}),
    Case("quest", {"block_size": 16, "top_k": 2, "window": 16}, full={"top_k": 1 << 10}),
    Case("blockmax", {"block_size": 16, "top_k": 2, "window": 16}, full={"top_k": 1 << 10}),
    Case("blockmax", {"block_size": 16, "top_k": 2, "window": 16, "min_layer_mass": 0.5}, full={"top_k": 1 << 10}),
    Case("moba", {"block_size": 16, "top_k": 1, "window": 16, "hidden_sinks": 2}, full={"top_k": 1 << 10}),
    Case("blockmax", {"block_size": 16, "top_k": 1, "window": 16, "hidden_sinks": 1, "share_kv_heads": True},
         full={"top_k": 1 << 10}),
    Case("blockmax", {"block_size": 8, "top_k": 3, "window": 0, "sink_tokens": 0, "query_block_size": 4,
                      "compensate": True}, full={"top_k": 1 << 10}),
    Case("quest", {"block_size": 8, "top_k": 3, "window": 0, "sink_tokens": 0}, full={"top_k": 1 << 10}),
    Case("quest", {"block_size": 16, "top_k": 2, "window": 16, "share_kv_heads": True}, full={"top_k": 1 << 10}),
    Case("infllm", {"block_size": 16, "top_k": 2, "window": 16, "representatives": 4}, full={"top_k": 1 << 10}),
    Case("infllm", {"block_size": 32, "top_k": 1, "window": 0, "representatives": 1}, full={"top_k": 1 << 10}),
    Case("longheads", {"block_size": 16, "top_k": 2, "window": 16}, full={"top_k": 1 << 10}),
    Case("longheads", {"block_size": 32, "top_k": 1, "window": 32, "sink_tokens": 32}, full={"top_k": 1 << 10}),
    Case("dhsa", {"block_size": 16, "top_k": 2, "window": 16, "unit": 4}, full={"top_k": 1 << 10}),
    Case("dhsa", {"block_size": 16, "top_k": 1, "window": 0, "sink_tokens": 0, "unit": 8, "threshold": 0.0},
         full={"top_k": 1 << 10}),
    Case("hip", {"block_size": 16, "top_k": 2, "window": 16}, full={"top_k": 1 << 10}),
    Case("hip", {"block_size": 8, "top_k": 3, "window": 0, "sink_tokens": 0}, full={"top_k": 1 << 10}),
    Case("routing", {"block_size": 16, "top_k": 2, "window": 16, "clusters": 4, "epoch_tokens": 64},
         full={"top_k": 1 << 10}),
    Case("routing", {"block_size": 16, "top_k": 1, "window": 0, "clusters": 8, "route_top": 2, "seed": 3},
         full={"top_k": 1 << 10}),
    Case("flexprefill", {"block_size": 16, "gamma": 0.5, "window": 16}, full={"gamma": 1.0},
         causal_selection=False),
    Case("flexprefill", {"block_size": 16, "gamma": 0.3, "tau": 1.0, "window": 0, "sink_tokens": 0},
         full={"gamma": 1.0}, causal_selection=False),
    Case("retrieval", {"top_k": 24, "window": 16}, full={"top_k": 1 << 10}),
    Case("retrieval", {"block_size": 8, "top_k": 2, "window": 8}, full={"top_k": 1 << 10}),
    # Eviction: dense prefill, then each KV head keeps sinks + window + budget_tokens tokens.
    Case("snapkv", {"budget_tokens": 8, "window": 16}, full={"budget_tokens": 1 << 20}, sparse_prefill=False,
         causal_selection=False),
    Case("snapkv", {"budget_tokens": 24, "window": 4, "sink_tokens": 0, "observe": 8, "pool": 1},
         full={"budget_tokens": 1 << 20}, sparse_prefill=False, causal_selection=False),
    Case("tova", {"budget_tokens": 8, "window": 8}, full={"budget_tokens": 1 << 20}, sparse_prefill=False,
         causal_selection=False),
    # Per-head methods on the 2-layer, 4-query / 2-KV-head test models; full = every head reads everything.
    Case("duo", {"block_size": 16, "window": 16, "retrieval_heads": ((0, 1),)}, full={"window": 1 << 20}),
    Case("duo", {"block_size": 16, "window": 0, "sink_tokens": 16, "retrieval_heads": ((0, 0), (1, 3)),
                 "granularity": "query_head"}, full={"retrieval_heads": tuple((a, b) for a in range(2) for b in range(4))}),
    Case("duo", {"block_size": 16, "window": 16, "retrieval_heads": ((0, 0), (1, 1)),
                 "selector": MoBA(block_size=16, top_k=1, window=16)},
         full={"window": 1 << 20, "selector": MoBA(block_size=16, top_k=1 << 10, window=16)}),
    Case("razor", {"block_size": 16, "window": 16, "retrieval_heads": ((0, 1),)}, full={"window": 1 << 20}),
    Case("razor", {"block_size": 16, "window": 32, "sink_tokens": 0, "retrieval_heads": ((1, 0),)},
         full={"retrieval_heads": ((0, 0), (0, 1), (1, 0), (1, 1))}),
    # act's calibration changes dense attention by design: its full case turns it off (factor 1).
    Case("act", {"base": MoBA(block_size=16, top_k=2, window=16), "threshold": 2.0},
         full={"base": MoBA(block_size=16, top_k=1 << 10, window=16), "factor": 1.0}),
]
