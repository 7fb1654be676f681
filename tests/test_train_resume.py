"""The trainer and its run directory on the tiny model: exact resume, exactly-once records after
a kill or a re-run, refusals that change nothing, replacement, clean-up of temporaries, and
the TensorBoard and W&B loggers (the rules themselves: tests/test_rundir.py and
tests/test_metrics_logger.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import polars as pl
import pytest

pytest.importorskip("torch")

from test_metrics_logger import wandb_history, wandb_offline
from test_rundir import tree_digest
from test_train import metric_steps, overrides
from treegrpo.config import load_config
from treegrpo.exceptions import RunDirError
from treegrpo.train import Trainer


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the synthetic world and warm start of tests/test_train.py, never in the user's cache
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path_factory.getbasetemp() / "treegrpo-cache"))


def train(tiny_dir: Path, run: Path, steps: int, **extra: str) -> dict[str, float]:
    cfg = load_config(None, overrides(tiny_dir, run, steps=steps, **extra))
    with Trainer(cfg, progress=False) as trainer:
        trainer.setup()
        return trainer.run()


def records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without timings (the only numbers a resumed run may change)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("timing_s/")} for r in lines]


def rollouts(run: Path, table: str) -> pl.DataFrame:
    scan = pl.scan_parquet(run / table / "**" / "*.parquet", hive_partitioning=True)
    key = "node" if table == "nodes" else "leaf"
    return scan.collect().sort("step", key)


def test_stop_at_step_3_and_continue_to_6_equals_an_uninterrupted_run(
    tiny_dir, tmp_path, monkeypatch
):
    whole = tmp_path / "whole"
    every = {"trainer.val_every": "2"}  # validations inside the run too (steps 2 and 4)
    final = train(tiny_dir, whole, steps=6, **every)
    # The other run is killed after step 4's metrics and rollout logs were written, before its
    # checkpoint: it continues from step 3's checkpoint and rolls step 4 out again.
    stopped = tmp_path / "stopped"
    save = Trainer.checkpoint

    def killed_at_step_4(self: Trainer) -> Any:
        if self.step == 4:
            raise KeyboardInterrupt
        return save(self)

    monkeypatch.setattr(Trainer, "checkpoint", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dir, stopped, steps=6, **every)
    monkeypatch.undo()
    assert metric_steps(stopped) == [1, 2, 3, 4]
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000003",
    ]
    again = train(tiny_dir, stopped, steps=6, **every)
    assert records(stopped) == records(whole)
    assert [r["step"] for r in records(whole)] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert [r["step"] for r in records(whole) if "val-core/all/acc/mean@1" in r] == [0, 2, 4, 6]
    for table in ("nodes", "trajectories"):
        a, b = rollouts(whole, table), rollouts(stopped, table)
        assert a.height > 0 and a.equals(b), table
    # the sampled rollouts differ between steps (the test would see a re-seeded generator)
    nodes = rollouts(whole, "nodes")
    texts = [nodes.filter(pl.col("step") == s)["action_text"].to_list() for s in (4, 5)]
    assert texts[0] != texts[1]
    assert {k: v for k, v in again.items() if not k.startswith("timing_s/")} == {
        k: v for k, v in final.items() if not k.startswith("timing_s/")
    }


def test_a_kill_after_the_first_validation_and_a_rerun_add_no_second_validation(
    tiny_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"

    def killed(self: Trainer) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", killed)  # dies in step 1, after validating
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dir, run, steps=2)
    monkeypatch.undo()
    assert [r["step"] for r in records(run)] == [0]
    validations = []
    real = Trainer.validate

    def counted(self: Trainer, tag: str) -> dict[str, float]:
        validations.append(tag)
        return real(self, tag)

    monkeypatch.setattr(Trainer, "validate", counted)
    final = train(tiny_dir, run, steps=2)
    assert validations == ["after"]  # step 0's validation is recorded: not run again
    assert [r["step"] for r in records(run)] == [0, 1, 2, 2]
    before = (run / "metrics.jsonl").read_bytes()
    # a re-run of the finished run trains nothing, validates nothing, writes no line
    assert train(tiny_dir, run, steps=2) == final
    assert validations == ["after"]
    assert (run / "metrics.jsonl").read_bytes() == before


def test_refused_starts_change_nothing_and_fail_before_any_model_loads(
    tiny_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    quick = {"trainer.val_before": "false", "trainer.val_after": "false"}
    train(tiny_dir, run, steps=1, **quick)
    before = tree_digest(run)

    def no_model(self: Trainer) -> Any:
        raise AssertionError("a model loaded for a run that is refused")

    monkeypatch.setattr(Trainer, "_load_policy", no_model)
    cases = {
        "trainer.resume=never": {"trainer.resume": "never"},
        "an incompatible config": {"tree.m": "3", "model.sft_steps": "1"},
    }
    for name, extra in cases.items():
        with pytest.raises(RunDirError) as caught:
            train(tiny_dir, run, steps=2, **quick, **extra)
        assert "\n" not in str(caught.value), name
        assert tree_digest(run) == before, name
    assert "model.sft_steps 2 -> 1; tree.m 2 -> 3" in str(caught.value)
    # a second trainer while the first holds the directory
    cfg = load_config(None, overrides(tiny_dir, run, steps=2, **quick))
    monkeypatch.undo()
    with Trainer(cfg, progress=False) as first:
        first.setup()
        monkeypatch.setattr(Trainer, "_load_policy", no_model)
        with pytest.raises(RunDirError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            with Trainer(cfg, progress=False) as second:
                second.setup()
    assert tree_digest(run)["metrics.jsonl"] == before["metrics.jsonl"]


def test_a_setup_that_fails_late_writes_nothing(tiny_dir, tmp_path, monkeypatch):
    import treegrpo.learner

    run = tmp_path / "run"
    quick = {"trainer.val_before": "false", "trainer.val_after": "false"}
    train(tiny_dir, run, steps=1, **quick)
    before = tree_digest(run)

    def broken(*args: Any, **kwargs: Any) -> None:  # set-up's last part fails
        raise RuntimeError("learner failed")

    monkeypatch.setattr(treegrpo.learner.Learner, "__init__", broken)
    with pytest.raises(RuntimeError, match="learner failed"):
        train(tiny_dir, run, steps=2, **quick, **{"trainer.logger": "[console]"})
    assert tree_digest(run) == before  # config.json included
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="learner failed"):
        train(tiny_dir, fresh, steps=2, **quick)
    assert not fresh.exists() and not (tmp_path / ".fresh.lock").exists()


def test_resume_replace_starts_over_and_removes_the_old_run_whole(tiny_dir, tmp_path):
    run = tmp_path / "run"
    quick = {"trainer.val_before": "false", "trainer.val_after": "false"}
    train(tiny_dir, run, steps=3, **quick)
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    # another tree shape, one step: nothing of the old run survives, nothing is mixed
    train(tiny_dir, run, steps=1, **quick, **{"trainer.resume": "replace", "tree.n": "1"})
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert metric_steps(run) == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert sorted(p.name for p in (run / "nodes").iterdir()) == ["step=000001"]
    traj = pl.read_parquet(run / "trajectories" / "step=000001" / "part-0.parquet")
    assert len(traj) == 2 * 2 * 2  # prompts x M trees x (1 + L*N) leaves with N = 1
    # and it continues as its own run
    train(tiny_dir, run, steps=2, **quick, **{"tree.n": "1"})
    assert metric_steps(run) == [1, 2]


def test_resume_removes_the_temporaries_and_torn_line_of_a_killed_run(tiny_dir, tmp_path):
    run = tmp_path / "run"
    quick = {"trainer.val_before": "false", "trainer.val_after": "false"}
    train(tiny_dir, run, steps=1, **quick)
    killed_save = run / "checkpoints" / ".step_000002.a1b2c3"
    killed_save.mkdir()
    (killed_save / "model.safetensors").write_bytes(b"\0" * 1024)
    killed_part = run / "nodes" / "step=000001" / ".part-0.parquet.x1y2.tmp"
    killed_part.write_bytes(b"PAR1")
    mine = run / "checkpoints" / "README"
    mine.write_text("not treegrpo's")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "critic/score/me')  # killed while writing step 2's line
    with pytest.warns(RuntimeWarning, match="torn last line 2"):
        train(tiny_dir, run, steps=2, **quick)
    assert not killed_save.exists() and not killed_part.exists() and mine.exists()
    assert not list(run.rglob("*.tmp")) and metric_steps(run) == [1, 2]


def test_tensorboard_and_wandb_loggers_hold_the_training_metrics(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb_offline(monkeypatch, tmp_path / "wandb-home")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    quick = {"trainer.val_before": "false", "trainer.logger": "[jsonl,tensorboard,wandb]"}
    train(tiny_dir, run, steps=2, **quick)
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 2]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = wandb_history(run)
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert [p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")] == [run_id]
    for record in jsonl:
        step = record["step"]
        for name, value in record.items():
            if name == "step":
                continue
            scalars = {e.step: e.value for e in events.Scalars(name)}
            assert scalars[step] == pytest.approx(value, rel=1e-6, abs=1e-30), name
            assert logged[step][name] == pytest.approx(value, rel=1e-12), name
    assert "val-core/all/acc/mean@1" in logged[2] and "actor/pg_loss" in logged[1]
