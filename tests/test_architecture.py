"""docs/architecture.md stays true: its worked example of a new method is one file that the registry finds,
and that passes the shared checks (full budget == dense, small budget != dense)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import longattn
import longattn.methods
from tests.conftest import tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example() -> tuple[str, str]:
    """The method file and the cases.py line of the doc's "Adding a method" section."""
    section = DOC.read_text().split("## Adding a method", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    dedent = [re.sub(r"^ {3}", "", b, flags=re.M) for b in blocks]
    return dedent[0], dedent[1].strip().rstrip(",")


@pytest.fixture
def localk(tmp_path, monkeypatch):
    code, _ = _example()
    (tmp_path / "localk.py").write_text(code)
    monkeypatch.setattr(longattn.methods, "__path__", [*longattn.methods.__path__, str(tmp_path)])
    yield
    sys.modules.pop("longattn.methods.localk", None)


def test_the_documented_method_is_found_by_its_file_alone(localk):
    assert "localk" in longattn.list_methods()
    method = longattn.get_method("localk", block_size=16, top_k=2)
    assert method.name == "localk" and method.summariser() == "mean"


def test_the_documented_method_passes_the_shared_checks(localk):
    _, line = _example()
    case = eval(line, {"Case": lambda name, config, full: (name, config, full)})  # noqa: S307 - our own doc
    name, config, full = case
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        with longattn.apply(model, longattn.get_method(name, **{**config, **full})) as session:
            assert session.method.name == "localk"
            torch.testing.assert_close(model(ids).logits, dense, atol=1e-4, rtol=1e-4)
        with longattn.apply(model, longattn.get_method(name, **config)) as session:
            sparse = model(ids).logits
    assert session.prefill_stats.density < 0.9 and (sparse - dense).abs().max() > 1e-3


def test_the_doc_names_every_layer_the_import_test_enforces():
    from tests.test_layers import LAYERS

    text = DOC.read_text()
    for layer in LAYERS:
        if layer not in ("__init__", "__main__"):
            assert f"`{layer}`" in text, layer
