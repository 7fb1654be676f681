"""`treegrpo train` end to end on a tiny model: config, the staged loop, logs, checkpoints,
resume after SIGKILL, and the SGLang path against the stand-in server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

torch = pytest.importorskip("torch")

from treegrpo.config import ConfigError, load_config  # noqa: E402
from treegrpo.train import Trainer  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # one synthetic world and warm start for the whole module, never in the user's cache
    root = tmp_path_factory.getbasetemp() / "treegrpo-cache"
    monkeypatch.setenv("TREEGRPO_CACHE", str(root))


def overrides(tiny_dir: Path, run_dir: Path, steps: int = 2, **extra: str) -> list[str]:
    base = {
        "preset": "smollm2",  # the reference settings, on a tiny random model
        "model.path": str(tiny_dir),
        "model.sft_steps": "2",
        "model.sft_batch_size": "2",
        "data.synth_docs": "80",
        "data.synth_train": "16",
        "data.synth_test": "8",
        "data.train_batch_size": "2",
        "data.val_size": "2",
        "tree.max_action_tokens": "6",
        "env.max_obs_tokens": "48",
        "trainer.total_steps": str(steps),
        "trainer.run_dir": str(run_dir),
        "trainer.logger": "[jsonl]",
        "engine.kv_budget_tokens": "4096",
        "engine.dtype": "policy",  # the same on every machine (auto depends on the CPU)
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "critic/score/mean" in json.loads(x)]


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text("[tree]\nm = 3\n\n[learner]\nlr = 2e-6\n")
    (tmp_path / "c.yaml").write_text("tree:\n  m: 4\ntrainer:\n  total_steps: 7\n")
    cfg = load_config(tmp_path / "c.toml", ["learner.lr=1e-5", "tree.n=1"])
    assert (cfg.tree.m, cfg.tree.n, cfg.learner.lr) == (3, 1, 1e-5)
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.tree.m, cfg.trainer.total_steps, cfg.learner.total_steps) == (4, 7, 7)
    with pytest.raises(ConfigError, match=r"unknown config key 'tree.mm' \(did you mean 'm'\?\)"):
        load_config(None, ["tree.mm=2"])
    with pytest.raises(ConfigError, match=r"engine\.kind must be one of 'embedded', 'sglang'"):
        load_config(None, ["engine.kind=vllm"])
    with pytest.raises(ConfigError, match="k \\(leaves kept per tree\\) must be in"):
        load_config(None, ["tree.k=5"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(None, ["tree.m"])


def test_bad_config_is_reported_before_any_model_loads(capsys):
    from treegrpo.cli import main

    assert main(["train", "learner.loss_agg_mode=sum"]) == 2
    err = capsys.readouterr().err
    assert "loss_agg_mode" in err and "token-mean" in err


def test_two_steps_end_to_end_then_resume(tiny_dir, tmp_path):
    run = tmp_path / "run"
    with Trainer(load_config(None, overrides(tiny_dir, run, steps=2)), progress=False) as trainer:
        trainer.setup()
        final = trainer.run()
    assert "val-core/all/acc/mean@1" in final
    assert metric_steps(run) == [1, 2]
    nodes = pl.scan_parquet(run / "nodes" / "**" / "*.parquet", hive_partitioning=True).collect()
    assert sorted(nodes["step"].unique().to_list()) == [1, 2]
    traj = pl.read_parquet(run / "trajectories" / "step=000002" / "part-0.parquet")
    assert len(traj) == 2 * 2 * 3  # prompts x M trees x (1 + L*N) leaves
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step1 = next(x for x in lines if x["step"] == 1 and "actor/pg_loss" in x)
    for name in ("actor/grad_norm", "actor/lr", "tree/leaves_per_prompt"):
        assert name in step1
    # every stage of the step is timed, and the parts fit inside their wholes
    stages = ("rollout", "gen", "tool", "reward", "adv", "old_log_prob", "update_actor")
    timing = {k: step1[f"timing_s/{k}"] for k in (*stages, "weight_sync", "log", "step")}
    assert all(v >= 0 for v in timing.values()) and timing["gen"] > 0
    assert timing["gen"] + timing["tool"] + timing["reward"] <= timing["rollout"]
    parts = ("rollout", "adv", "old_log_prob", "update_actor", "weight_sync", "log")
    assert sum(timing[k] for k in parts) <= timing["step"]
    assert step1["tree/leaves_per_prompt"] == 6
    # resume: two more steps continue from step 2, nothing repeated
    cfg = load_config(None, overrides(tiny_dir, run, steps=4, **{"trainer.val_before": "false"}))
    with Trainer(cfg, progress=False) as again:
        again.setup()
        assert again.step == 2
        again.run()
    assert metric_steps(run) == [1, 2, 3, 4]


def test_bfloat16_engine_generates_from_a_replica_synced_after_every_update(tiny_dir, tmp_path):
    import torch

    run = tmp_path / "run"
    cfg = load_config(
        None,
        overrides(
            tiny_dir, run, steps=2, **{"engine.dtype": "bfloat16", "trainer.val_before": "false"}
        ),
    )
    with Trainer(cfg, progress=False) as trainer:
        trainer.setup()
        engine_model = trainer.engine.model
        assert engine_model is not trainer.model
        assert {p.dtype for p in engine_model.parameters()} == {torch.bfloat16}
        before = {k: v.clone() for k, v in engine_model.state_dict().items()}
        version = int(trainer.engine.weight_version)
        trainer.run()
        assert trainer.engine.model is engine_model  # refreshed in place, never rebuilt
        state = trainer.model.state_dict()
        moved = False
        for name, value in engine_model.state_dict().items():
            # the replica holds the trained float32 weights, rounded to bfloat16
            assert torch.equal(value, state[name].to(torch.bfloat16)), name
            moved |= not torch.equal(value, before[name])
        assert moved, "two updates changed no engine weight"
        assert int(trainer.engine.weight_version) == version + 2  # one sync per update
    assert metric_steps(run) == [1, 2]
    # policy: the engine shares the learner's weights, whatever the CPU
    same = load_config(None, overrides(tiny_dir, tmp_path / "same", steps=0))
    with Trainer(same, progress=False) as trainer:
        trainer.setup()
        assert trainer.engine.model is trainer.model


def test_sigkill_mid_run_resumes_without_losing_or_repeating_steps(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = overrides(tiny_dir, run, steps=3, **{"trainer.val_before": "false"})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "treegrpo", "train", "--no-progress", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_000001" / "COMPLETE").exists():
        assert proc.poll() is None, "training exited before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert metric_steps(run) == [1, 2, 3]
    parts = sorted(p.parent.name for p in (run / "trajectories").glob("step=*/part-0.parquet"))
    assert parts == ["step=000001", "step=000002", "step=000003"]
    assert not list(run.rglob("*.tmp"))


def test_two_steps_against_the_sglang_standin(tiny_dir, tmp_path):
    from treegrpo.testing.sglang_standin import start_standin

    url, stop = start_standin(str(tiny_dir), port=0)
    try:
        run = tmp_path / "run"
        extra = {
            "engine.kind": "sglang",
            "engine.urls": f"[{url}]",
            "trainer.val_before": "false",
            "trainer.val_after": "false",
        }
        with Trainer(load_config(None, overrides(tiny_dir, run, **extra)), progress=False) as t:
            t.setup()
            t.run()
        assert metric_steps(run) == [1, 2]
        nodes = pl.read_parquet(run / "nodes" / "step=000002" / "part-0.parquet")
        # step 2's rollout came from the weights pushed after step 1
        assert set(nodes["weight_version"].drop_nulls().to_list()) == {"1"}
    finally:
        stop()


def test_no_validation_questions_means_no_validation_record(tiny_dir, tmp_path, capsys):
    """A run without validation questions says so and records no EM (never a made-up 0)."""
    from dataclasses import replace

    run = tmp_path / "run"
    with Trainer(load_config(None, overrides(tiny_dir, run, steps=1)), progress=False) as trainer:
        trainer.setup()
        trainer.data = replace(trainer.data, val=[])
        assert trainer.run() == {}
    assert "validation (before) skipped: no validation questions" in capsys.readouterr().out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(k.startswith("val-core/") for r in records for k in r)
