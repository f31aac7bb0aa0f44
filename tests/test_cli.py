"""The command line: methods listing, one generation, demo argument checks."""

from __future__ import annotations

from typer.testing import CliRunner

from longattn.cli import app
from tests.conftest import save_tiny_checkpoint

runner = CliRunner()


def test_methods_lists_every_method_with_its_paper():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("dense", "streaming", "moba"):
        assert name in result.output
    assert "2502.13189" in result.output  # MoBA's arXiv id


def test_generate_runs_a_method_on_a_local_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 200 + 3}" for i in range(300)))
    result = runner.invoke(
        app,
        ["generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "ckpt"), "--method", "moba",
         "--set", "block_size=16", "--set", "top_k=2", "--set", "window=16", "--max-new-tokens", "4"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "prefill density" in result.output
    density = float(result.output.rsplit("prefill density", 1)[1].split()[0])
    assert 0 < density < 0.9


def test_generate_rejects_bad_method_options(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("w1 w2")
    result = runner.invoke(app, ["generate", "--prompt-file", str(prompt), "--set", "top_k=-1"])
    assert result.exit_code != 0
    assert "top_k" in str(result.exception) + result.output


def test_demo_rejects_bad_lengths():
    result = runner.invoke(app, ["demo", "--lengths", "2k"])
    assert result.exit_code != 0
    assert "--lengths" in result.output
