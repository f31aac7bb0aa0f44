"""The shared Triton helpers: sizing, and the operators importable and usable where Triton is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from longattn.ops.triton_utils import dot_tile, fill_splits, kernel_flags

WITHOUT_TRITON = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, NoTriton())
import importlib.util
importlib.util.find_spec = (lambda real: lambda name, *a: None if name.split(".")[0] == "triton" else real(name, *a))(
    importlib.util.find_spec)
import torch
import longattn
from longattn.ops import block_sparse_attention, resolve_backend, triton_available
from longattn.ops.block_topk import block_topk, fused_topk_available
from longattn.core.selection import Selection
assert not triton_available() and not fused_topk_available()
assert resolve_backend("auto", "cuda") == "gather"
try:
    resolve_backend("triton", "cpu")
except ValueError as err:
    assert "needs the triton package" in str(err), err
else:
    raise AssertionError("backend='triton' without triton must raise")
q = torch.randn(1, 2, 16, 8)
sel = Selection.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 16)
out, lse = block_sparse_attention(q, q, q, sel)
assert "triton" not in sys.modules
print("ok")
"""


def test_ops_import_and_run_without_triton():
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]


def test_tile_and_split_sizing():
    assert [dot_tile(n) for n in (0, 1, 16, 17, 64, 65, 256)] == [16, 16, 16, 32, 64, 128, 256]
    cpu = torch.device("cpu")  # the interpreter counts 4 multiprocessors
    assert fill_splits(1, 100, cpu) == 8 and fill_splits(1, 3, cpu) == 3 and fill_splits(1000, 100, cpu) == 1
    flags = kernel_flags(torch.tensor([[True, False]]), torch.zeros(1))
    assert flags.dtype == torch.uint8 and flags.tolist() == [[1, 0]]
    assert kernel_flags(None, torch.zeros(1)).tolist() == [1]
