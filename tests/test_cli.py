"""The command line: methods listing, one generation, the demo, bench and report, and every user mistake as a
usage error that names its option (exit code 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from longattn.cli import app
from tests.conftest import save_tiny_checkpoint, tiny_model

runner = CliRunner()


def invoke(*args: str):
    """Run the CLI with a terminal wide enough that no error message wraps."""
    return runner.invoke(app, list(args), terminal_width=300, env={"COLUMNS": "300"})


def assert_usage_error(result, option: str, *words: str) -> None:
    """Exit code 2 (click's usage error), a message naming ``option`` and ``words``, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in (option, *words):
        assert word in result.output, (word, result.output)


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("w1 w2 w3")
    return path


def test_methods_lists_every_method_with_its_paper():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("dense", "streaming", "moba", "quest", "infllm", "longheads", "dhsa", "hip", "routing",
                 "flexprefill", "retrieval", "duo", "razor", "act"):
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


def test_demo_rejects_bad_lengths_and_policies():
    for args, word in ((["--lengths", "2x"], "lengths"), (["--lengths", "64"], "128"),
                       (["--extension", "--positions", "rope"], "positions must be one of"),
                       (["--positions", "infllm"], "add --extension"), (["--method", "nope"], "unknown method")):
        result = invoke("demo", *args)
        assert result.exit_code != 0
        assert word in result.output


def test_bench_then_report_on_a_local_checkpoint(tmp_path):
    """`longattn bench` writes one line per cell and resumes; `longattn report` renders tables and figures."""
    import json

    save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "r.jsonl"
    args = ["bench", "--task", "niah_single", "--methods", "dense,moba", "--set", "moba.block_size=8",
            "--set", "moba.top_k=1", "--set", "moba.window=8", "--lengths", "200", "--depths", "0.5",
            "--seeds", "2", "--recall-queries", "4", "--max-new-tokens", "2", "--model", str(tmp_path / "ckpt"),
            "--out", str(out)]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "4 cells run, 0 already" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and {r["label"] for r in lines} == {"dense", "moba"}
    assert all(r["config"]["top_k"] == 1 for r in lines if r["label"] == "moba")
    assert all(r["backend"] == "auto" for r in lines)
    again = runner.invoke(app, args, terminal_width=200)
    assert "0 cells run, 4 already" in again.output and len(out.read_text().splitlines()) == 4

    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "niah_single" in report and "moba" in report
    heatmaps = list((tmp_path / "rep").glob("heatmap_niah_single*.png"))
    assert len(heatmaps) == 1 and heatmaps[0].read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_bad_arguments():
    # Every case must fail before the model loads (a valid one would start a real sweep).
    for args, word in ((["--task", "nope"], "--task"), (["--methods", "dense,dense"], "--methods"),
                       (["--methods", "dense", "--set", "moba.top_k=2"], "--set"), (["--lengths", "2x"], "lengths"),
                       (["--haystack", "web"], "--haystack"), (["--methods", "moba", "--set", "moba.top_k=-1"], "top_k"),
                       (["--device", "tpu"], "--device must be cpu or cuda"),
                       (["--backend", "magic"], "backend must be one of"), (["--depths", "0.5,1.5"], "--depths"),
                       (["--lengths", "64"], "at least 128")):
        result = runner.invoke(app, ["bench", *args], terminal_width=200)
        assert result.exit_code != 0 and word in result.output, (args, result.output)


def test_heads_profile_then_show_on_a_local_checkpoint(tmp_path):
    from longattn.core.profile import SCORES, HeadProfile

    save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "prof" / "p.json"
    result = runner.invoke(app, ["heads", "profile", "--model", str(tmp_path / "ckpt"), "--lengths", "200",
                                 "--depths", "0.3,0.7", "--out", str(out), "--window", "32"], terminal_width=200)
    assert result.exit_code == 0, result.output
    profile = HeadProfile.load(out)
    assert (profile.num_layers, profile.num_heads, profile.settings["prompts"]) == (2, 4, 2)
    assert profile.settings["window"] == 32
    for score in SCORES:
        assert (out.parent / f"p_{score}.png").is_file()
    shown = runner.invoke(app, ["heads", "show", str(out)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "strongest retrieval heads" in shown.output


def test_heads_show_rejects_a_file_that_is_not_a_profile(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    result = runner.invoke(app, ["heads", "show", str(bad)])
    assert result.exit_code != 0
    assert "HeadProfile" in result.output


def test_heads_show_names_the_field_of_a_profile_with_a_nan_score(tmp_path):
    from tests.core.test_profile import _profile

    data = json.loads(json.dumps(_profile(tiny_model("llama")).to_dict()))  # a copy: the grids share rows
    data["streaming"][1][2] = float("nan")  # json writes NaN, and json.loads reads it back
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(data))
    result = invoke("heads", "show", str(path))
    assert_usage_error(result, "PROFILE", "HeadProfile.streaming[1][2] must be a finite number in [0, 1], got nan")


@pytest.mark.parametrize("args, option, words", [
    (["--set", "top_k=abc"], "--set", ["top_k must be an integer", "'abc'"]),
    (["--set", "top_k"], "--set", ["key=value"]),
    (["--set", "no_such_option=1"], "--set", ["no_such_option"]),
    (["--method", "nope"], "--method", ["unknown method name 'nope'", "known methods", "moba"]),
], ids=["wrong-type", "no-equals", "unknown-option", "unknown-method"])
def test_generate_method_mistakes_are_usage_errors(prompt, args, option, words):
    # Checked before any model loads: the embedded default would take 40 s.
    result = invoke("generate", "--prompt-file", str(prompt), *args)
    assert_usage_error(result, option, *words)


def test_generate_rejects_a_checkpoint_without_tokenizer_files(tmp_path, prompt):
    tiny_model("llama").save_pretrained(tmp_path / "bare")  # weights and config, no tokenizer
    result = invoke("generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "bare"))
    assert_usage_error(result, "--model", "tokenizer files", "bare")


def test_generate_rejects_a_model_path_that_does_not_exist(tmp_path, prompt):
    result = invoke("generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "x.gguf"))
    assert_usage_error(result, "--model", "no such GGUF file")


@pytest.mark.parametrize("text", ["", "  \n\n "], ids=["empty", "whitespace"])
def test_generate_rejects_an_empty_prompt_file(tmp_path, text):
    empty = tmp_path / "empty.txt"
    empty.write_text(text)
    result = invoke("generate", "--prompt-file", str(empty))
    assert_usage_error(result, "--prompt-file", "empty")


def test_bench_out_must_not_be_a_directory(tmp_path):
    result = invoke("bench", "--out", str(tmp_path))
    assert_usage_error(result, "--out", "directory")


def test_bench_rejects_a_damaged_results_file_before_loading(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("not json\n")
    result = invoke("bench", "--out", str(out))
    assert_usage_error(result, "--out", "r.jsonl:1")


def test_report_out_must_not_be_a_file(tmp_path):
    results, taken = tmp_path / "r.jsonl", tmp_path / "taken"
    results.write_text('{"task": "t", "method": "m", "length": 128, "seed": 0, "score": 1}\n')
    taken.write_text("a file")
    result = invoke("report", str(results), "--out", str(taken))
    assert_usage_error(result, "--out", "file")


def test_report_rejects_a_malformed_results_file(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text("[1, 2]\n")
    result = invoke("report", str(results), "--out", str(tmp_path / "rep"))
    assert_usage_error(result, "RESULTS", "line 1: expected a JSON object")


@pytest.mark.parametrize("extension", [False, True], ids=["headline", "extension"])
def test_demo_runs_dense_against_a_method_on_the_sweep_runner(tmp_path, extension):
    save_tiny_checkpoint(tmp_path / "ckpt")
    flags = ["--extension"] if extension else ["--set", "block_size=16", "--set", "top_k=2", "--set", "window=32"]
    result = invoke("demo", "--lengths", "200", "--samples", "2", "--model", str(tmp_path / "ckpt"), *flags)
    assert result.exit_code == 0, result.output
    assert "passkey retrieval; the model was trained on 4096 tokens" in result.output
    assert "dense: " in result.output and "/2 correct" in result.output
    other = "dense + self_extend positions" if extension else "moba"
    assert f"{other}: " in result.output
    rows = [line for line in result.output.splitlines() if line.startswith(("│ dense", "│ moba"))]
    assert len(rows) == 4 and all(" 200 │" in row for row in rows)  # 2 prompts x 2 methods
    assert len({row.split("│")[3].strip() for row in rows}) == 2  # a key per prompt, shared by both methods
    speedups = [row.split("│")[8].strip() for row in rows]
    assert all(s.endswith("x") for s in speedups) and "1.00x" in speedups  # dense against itself
    assert ("longattn demo --extension" in result.output) != extension


@pytest.mark.parametrize("module", ["longattn.cli", "longattn"])
def test_python_dash_m_runs_the_heads_sub_app(module):
    result = subprocess.run([sys.executable, "-m", module, "heads", "--help"], capture_output=True, text=True,
                            env={"COLUMNS": "200", "PATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "profile" in result.stdout and "show" in result.stdout


def test_dtype_is_checked_before_the_model_loads(prompt, tmp_path):
    result = invoke("generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "none"), "--dtype", "int8")
    assert_usage_error(result, "--dtype", "float32, bfloat16, float16", "'int8'")


def test_generate_runs_in_bfloat16(prompt, tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt")
    result = invoke("generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "ckpt"), "--dtype", "bfloat16",
                    "--max-new-tokens", "2", "--method", "streaming", "--set", "block_size=16")
    assert result.exit_code == 0, result.output


def test_context_parallel_outside_torchrun_is_a_usage_error(prompt):
    result = invoke("generate", "--prompt-file", str(prompt), "--context-parallel")
    assert_usage_error(result, "--context-parallel", "torchrun")
    result = invoke("bench", "--context-parallel", "--recall-queries", "4")
    assert_usage_error(result, "--context-parallel", "--recall-queries 0")


def test_torchrun_runs_generate_and_bench_on_two_ranks(tmp_path):
    """The documented launch: `torchrun --nproc-per-node 2 -m longattn ... --context-parallel`."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this python")
    save_tiny_checkpoint(tmp_path / "ckpt")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i % 200 + 3}" for i in range(300)))
    moba = ["--set", "block_size=16", "--set", "top_k=2", "--set", "window=16"]
    base = [str(torchrun if torchrun.exists() else shutil.which("torchrun")), "--standalone", "--nproc-per-node=2",
            "-m", "longattn"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    gen = subprocess.run(base + ["generate", "--prompt-file", str(prompt), "--model", str(tmp_path / "ckpt"),
                                 "--method", "moba", *moba, "--max-new-tokens", "4", "--context-parallel"],
                         capture_output=True, text=True, timeout=300, env=env)
    if gen.returncode != 0 and "gloo" in gen.stderr.lower() and "connect" in gen.stderr.lower():
        pytest.skip(f"gloo cannot connect here: {gen.stderr[-300:]}")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.count("prefill density") == 1, "only rank 0 prints"
    out = tmp_path / "r.jsonl"
    bench = subprocess.run(base + ["bench", "--task", "passkey", "--methods", "dense,moba", "--set", "moba.block_size=16",
                                   "--set", "moba.top_k=2", "--set", "moba.window=16", "--lengths", "256",
                                   "--depths", "0.5", "--seeds", "2", "--recall-queries", "0", "--max-new-tokens", "2",
                                   "--model", str(tmp_path / "ckpt"), "--out", str(out), "--context-parallel"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert bench.returncode == 0, bench.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4, "rank 0 alone writes each cell once"
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    assert all(r["hardware"]["context_parallel_ranks"] == 2 for r in records)
