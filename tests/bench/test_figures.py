"""Figures: head figures (sink map, profile heat map) drawn on Figure objects, without touching the backend."""

from __future__ import annotations

import struct
import types

import numpy as np
import pytest
import torch

from longattn.bench.figures import profile_heatmap, short_length, sink_map

try:
    from longattn.core.profile import HeadProfile
except ImportError:  # before the move out of analysis
    from longattn.analysis.heads import HeadProfile

PNG = b"\x89PNG"


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, read from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:4] == PNG
    return struct.unpack(">II", data[16:24])


def tiny_profile(layers: int = 3, heads: int = 4) -> HeadProfile:
    grid = [[(layer * heads + h) / (layers * heads) for h in range(heads)] for layer in range(layers)]
    model = {"name": "tiny", "model_type": "llama", "num_layers": layers, "num_heads": heads, "num_kv_heads": 2,
             "head_dim": 16}
    return HeadProfile(model=model, settings={}, retrieval=grid, streaming=grid, hidden_sink_mass=grid,
                       initial_sink_mass=grid)


def recorder(layers=(0, 1), heads: int = 4, tokens: int = 40):
    """What sink_map reads of a HeadRecorder: layer -> [Hq, Tk] sink ratios, with a strong sink at 7."""
    ratios = {}
    for layer in layers:
        r = torch.rand(heads, tokens, generator=torch.Generator().manual_seed(layer)) * 2
        r[:, 7] = 50.0
        ratios[layer] = r
    return types.SimpleNamespace(ratios=ratios)


def test_profile_heatmap_writes_one_png_per_score_and_grows_with_the_grid(tmp_path):
    small = profile_heatmap(tiny_profile(2, 2), tmp_path / "a" / "small.png")
    big = profile_heatmap(tiny_profile(12, 8), tmp_path / "b" / "big.png", score="streaming")
    assert small == tmp_path / "a" / "small.png" and big.is_file()
    (w1, h1), (w2, h2) = png_size(small), png_size(big)
    assert w2 > w1 and h2 > h1
    for score in ("hidden_sink_mass", "initial_sink_mass"):
        assert png_size(profile_heatmap(tiny_profile(), tmp_path / f"{score}.png", score))[0] > 0


def test_profile_heatmap_rejects_an_unknown_score(tmp_path):
    with pytest.raises(ValueError, match="score must be one of"):
        profile_heatmap(tiny_profile(), tmp_path / "x.png", score="nope")
    assert not (tmp_path / "x.png").exists()


def test_sink_map_draws_one_panel_per_head(tmp_path):
    tokens = [f"t{i}" for i in range(40)]
    one = sink_map(recorder(), [(0, 1)], tokens, tmp_path / "one.png")
    three = sink_map(recorder(), [(0, 1), (1, 0), (1, 3)], tokens, tmp_path / "deep" / "three.png", top=3)
    assert one == tmp_path / "one.png" and three.is_file()
    assert png_size(three)[1] > 2 * png_size(one)[1]
    # Plain arrays do as well as tensors (the recorder is read, not type-checked).
    as_arrays = types.SimpleNamespace(ratios={0: np.ones((4, 10))})
    assert sink_map(as_arrays, [(0, 0)], tokens[:5], tmp_path / "arrays.png").is_file()


def test_sink_map_rejects_no_heads_and_unseen_layers(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        sink_map(recorder(), [], [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no prefill of layer 5"):
        sink_map(recorder(), [(0, 0), (5, 0)], [], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_head_figures_leave_the_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    profile_heatmap(tiny_profile(), tmp_path / "p.png")
    sink_map(recorder(), [(0, 0)], [], tmp_path / "s.png")
    assert matplotlib.get_backend() == before


@pytest.mark.parametrize("n, text", [(128, "128"), (1024, "1k"), (4096, "4k"), (1280, "1.25k"), (1000, "1000")])
def test_short_length(n, text):
    assert short_length(n) == text
