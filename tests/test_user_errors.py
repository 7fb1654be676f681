"""User errors of the command line are one line and exit code 2 (tracebacks only for bugs, or
with --debug); the cheap checks run before any model loads; config bounds and finiteness."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from treegrpo.cli import main
from treegrpo.config import MAX_LEAVES_PER_STEP, MAX_TOKENS, ConfigError, load_config
from treegrpo.exceptions import InvalidArgumentError
from treegrpo.rollout import RolloutConfig


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one stderr line of a user error of ``treegrpo COMMAND`` (and nothing else)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"treegrpo {command}: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------- config: no model


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path: Path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"tree:\n  m: 2\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text \(byte 18, line 3\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"config file .* is not a file"):
        load_config(tmp_path)


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'tree\.m=\[1': the value does not parse"):
        load_config(None, ["tree.m=[1"])
    with pytest.raises(ConfigError, match="does not parse as YAML"):
        load_config(None, ["env.reward_fn={a: b"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tree.m=99999999999999999999", r"tree\.m = 99999999999999999999 is out of range"),
        ("trainer.seed=-99999999999999999999", r"trainer\.seed = -9+ is out of range"),
        ("tree.m=10000000", r"tree\.m = 10,000,000 is above the maximum 1,048,576"),
        ("tree.m=200000", r"2 x 200000 x 3 = 1,200,000 leaves, above the maximum"),
        ("tree.n=3000000", r"tree\.n = 3,000,000 is above"),
        ("tree.l=3000000", r"tree\.l = 3,000,000 is above"),
        ("tree.max_turns=5000", r"tree\.max_turns = 5,000 is above the maximum 1,024"),
        ("tree.max_action_tokens=2000000", r"tree\.max_action_tokens = 2,000,000 is above"),
        ("env.max_obs_tokens=2000000", r"env\.max_obs_tokens = 2,000,000 is above"),
        ("env.topk=5000", r"env\.topk must be <= 1000"),
        ("learner.logprob_chunk_tokens=99999999", r"learner\.logprob_chunk_tokens = 99,999,999"),
        ("learner.micro_batch_tokens=99999999", r"learner\.micro_batch_tokens = 99,999,999"),
        ("learner.ppo_epochs=99999999", r"learner\.ppo_epochs = 99,999,999"),
        ("data.synth_docs=9999999999", r"data\.synth_docs = 9,999,999,999 is above"),
        ("data.val_size=9999999999", r"data\.val_size = 9,999,999,999 is above"),
        ("model.sft_batch_size=9999999999", r"model\.sft_batch_size = 9,999,999,999 is above"),
        ("tree.seed=-1", r"tree\.seed must be in \[0, 2\^63 - 1\]"),
        ("trainer.seed=-1", r"trainer\.seed must be in"),
        ("tree.temperature=.inf", r"tree\.temperature must be a finite number; got inf"),
        ("tree.temperature=.nan", r"tree\.temperature must be a finite number; got nan"),
        ("tree.top_p=.nan", r"tree\.top_p must be a finite number"),
        ("tree.overexpand_penalty=.inf", r"tree\.overexpand_penalty must be a finite"),
        ("tree.schedule=eventually", r"tree\.schedule must be one of 'async', 'lockstep'"),
        ("learner.lr=inf", r"learner\.lr must be a finite number; got inf"),
        ("learner.grad_clip=.inf", r"learner\.grad_clip must be a finite number"),
        ("learner.clip_ratio_c=1e999", r"learner\.clip_ratio_c must be a finite number"),
        ("learner.betas=[0.9, .nan]", r"learner\.betas must be a finite number"),
        ("model.sft_lr=-.inf", r"model\.sft_lr must be a finite number"),
        ("engine.retry_window_s=-1", r"engine\.retry_window_s must be in \[0, 86400\]"),
    ],
)
def test_sizes_are_bounded_and_floats_finite(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["preset=smollm2", "data.train_batch_size=2", override])


def test_the_bounds_leave_real_settings_alone():
    # the Tree-GRPO QA runs' shape at scale: 512 prompts x 4 trees x (1 + 1 x 2) leaves
    cfg = load_config(None, ["data.train_batch_size=512", "tree.m=4", "tree.max_turns=4"])
    assert cfg.data.train_batch_size * cfg.tree.m * cfg.tree.leaves_per_tree == 6144
    edge = MAX_LEAVES_PER_STEP // 3
    assert load_config(None, ["data.train_batch_size=1", f"tree.m={edge}"]).tree.m == edge
    assert load_config(None, [f"tree.max_action_tokens={MAX_TOKENS}"]).tree.max_action_tokens
    assert load_config(None, ["engine.retry_window_s=0"]).engine.retry_window_s == 0.0
    assert load_config(None, ["learner.grad_clip=null"]).learner.grad_clip is None


def test_rollout_config_checks_finiteness_itself():
    # the Python API, without the config loader
    for bad in ({"temperature": math.inf}, {"temperature": math.nan}):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            RolloutConfig(**bad)
    with pytest.raises(ValueError, match="overexpand_penalty must be a finite number"):
        RolloutConfig(overexpand_penalty=math.inf)


# ---------------------------------------------------------------------- data synth


def test_data_synth_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "world"
    assert main(["data", "synth", "--out", str(out), "--docs", "0"]) == 2
    assert "--docs must be >= 60" in one_line_error(capsys, "data synth")
    assert main(["data", "synth", "--out", str(out), "--docs", "100", "--test", "0"]) == 2
    assert "--test must be >= 1" in one_line_error(capsys, "data synth")
    file = tmp_path / "file"
    file.write_text("mine")
    assert main(["data", "synth", "--out", str(file), "--docs", "60"]) == 2
    assert f"--out {file} is a file" in one_line_error(capsys, "data synth")
    assert file.read_text() == "mine" and not out.exists()


# ---------------------------------------------------------------------- treegrpo train


@pytest.fixture
def no_model_loads(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The tiny model's directory; every case that takes it must fail before a model loads:
    loading one fails the test."""
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path_factory.getbasetemp() / "treegrpo-cache"))
    from treegrpo.train import Trainer

    def loads(self: Any) -> Any:
        raise AssertionError("a model loaded before the user error was found")

    monkeypatch.setattr(Trainer, "_load_policy", loads)
    return tiny_dir


def train(tiny_dir: Path, run_dir: Path, *extra: str) -> int:
    small = {
        "preset": "smollm2",  # the reference settings, on a tiny random model
        "model.path": str(tiny_dir),
        "model.sft_steps": "0",
        "data.synth_docs": "80",
        "data.synth_train": "16",
        "data.synth_test": "8",
        "data.val_size": "2",
        "trainer.run_dir": str(run_dir),
        "trainer.logger": "[jsonl]",
    }
    return main(["train", "--no-progress", *(f"{k}={v}" for k, v in small.items()), *extra])


def test_train_config_errors(
    no_model_loads: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    tiny_dir = no_model_loads
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"tree:\n  m: 2\n# caf\xe9\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not UTF-8 text" in one_line_error(capsys, "train")
    for override, message in (
        ("tree.m=[1", "does not parse as YAML"),
        ("tree.m=99999999999999999999", "tree.m = 99999999999999999999 is out of range"),
        ("tree.temperature=.inf", "tree.temperature must be a finite number"),
    ):
        assert train(tiny_dir, tmp_path / "run", override) == 2
        assert message in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_setup_errors_come_before_any_model_loads(
    no_model_loads: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    tiny_dir = no_model_loads
    run = tmp_path / "run"
    file = tmp_path / "file"
    file.write_text("not a directory")
    assert train(tiny_dir, file) == 2
    assert f"trainer.run_dir={file} is a file" in one_line_error(capsys, "train")
    assert file.read_text() == "not a directory"

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text('{"model_type": "bogus"}')
    assert train(tiny_dir, run, f"model.path={bogus}") == 2
    line = one_line_error(capsys, "train")
    assert f"model.path={bogus}: its config.json does not load" in line and "bogus" in line
    (bogus / "config.json").write_text("{not json")
    assert train(tiny_dir, run, f"model.path={bogus}") == 2
    assert "not a valid JSON file" in one_line_error(capsys, "train")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert train(tiny_dir, run, f"model.path={config_only}") == 2
    assert "holds no weights" in one_line_error(capsys, "train")
    assert train(tiny_dir, run, f"model.path={tmp_path / 'nowhere'}") == 2
    assert "no such directory" in one_line_error(capsys, "train")

    import torch

    if not torch.cuda.is_available():
        assert train(tiny_dir, run, "model.device=cuda") == 2
        assert "model.device=cuda, but torch sees no CUDA" in one_line_error(capsys, "train")

    missing = tmp_path / "corpus.jsonl"
    assert train(tiny_dir, run, f"data.corpus={missing}") == 2
    assert f"data.corpus={missing}: no such file" in one_line_error(capsys, "train")
    # nothing of the run was written by a setup that failed its cheap checks
    assert not run.exists()

    assert train(tiny_dir, run, "env.reward_fn=no_such_module_here:score") == 2
    assert "no_such_module_here" in one_line_error(capsys, "train")


def test_a_missing_logger_backend_is_found_before_any_model_loads(
    no_model_loads: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    tiny_dir = no_model_loads
    import importlib.util

    find_spec = importlib.util.find_spec

    def without_wandb(name: str, *args: Any) -> Any:
        return None if name == "wandb" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_wandb)
    assert train(tiny_dir, tmp_path / "run", "trainer.logger=[jsonl, wandb]") == 2
    line = one_line_error(capsys, "train")
    assert "trainer.logger includes wandb" in line and "pip install wandb" in line


def test_dead_servers_are_found_before_any_model_loads(
    no_model_loads: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    tiny_dir = no_model_loads
    url = dead_url()
    assert train(tiny_dir, tmp_path / "run", "env.retriever=http", f"env.retriever_url={url}") == 2
    line = one_line_error(capsys, "train")
    assert f"retriever at {url}/retrieve is unavailable" in line
    sglang = ["engine.kind=sglang", f"engine.urls=[{url}]", "engine.retry_window_s=0.5"]
    assert train(tiny_dir, tmp_path / "run2", *sglang) == 2
    line = one_line_error(capsys, "train")
    assert f"SGLang server {url} is unavailable" in line and "2 attempts" in line


def test_debug_shows_the_traceback(no_model_loads: Path, tmp_path: Path):
    with pytest.raises(InvalidArgumentError, match="no such directory"):
        main(["--debug", "train", f"model.path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"tree\.temperature"):
        main(["train", "--debug", "tree.temperature=.inf"])


def test_python_m_treegrpo_train_reports_user_errors_the_same_way(tmp_path: Path):
    # the torchrun entry point, in its own process
    cmd = [sys.executable, "-m", "treegrpo.train", f"model.path={tmp_path / 'nowhere'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("treegrpo train: error: model.path=")
    done = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr
