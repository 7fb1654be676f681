"""Run directories without a model: the lock, what resume modes accept and refuse, atomic
replacement, and the clean-up of a killed run's temporaries (tests/test_train_resume.py runs
the same rules through the trainer on the tiny model)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from treegrpo.config import ConfigError, TrainConfig, load_config
from treegrpo.exceptions import RunDirError
from treegrpo.rundir import RunDir, config_differences


def config(**trainer: object) -> dict:
    cfg = TrainConfig().to_dict()
    cfg["trainer"].update(trainer)
    return cfg


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), to show nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_run(path: Path, cfg: dict, step: int = 2) -> str:
    """A committed run with one checkpoint marker and a metrics line (no model needed)."""
    rd = RunDir(path)
    rd.open(cfg)
    rd.commit(cfg)
    ckpt = path / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(str(step))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "critic/score/mean": 0.5}) + "\n")
    rd.close()
    return rd.run_id


def test_nothing_is_written_before_commit_and_a_failed_start_leaves_no_trace(tmp_path):
    run = tmp_path / "runs" / "a"
    rd = RunDir(run)
    rd.open(config())
    assert not run.exists()  # open only locks (beside the directory) and reads
    rd.close()  # set-up failed: no commit
    assert not run.exists() and list((tmp_path / "runs").iterdir()) == []
    rd = RunDir(run)
    rd.open(config())
    rd.commit(config())
    record = json.loads((run / "run.json").read_text())
    assert record["config"] == json.loads(json.dumps(config()))
    assert record["host"] == socket.gethostname() and len(record["run_id"]) == 32
    assert json.loads((run / "config.json").read_text())["trainer"]["resume"] == "auto"
    rd.close()
    assert (tmp_path / "runs" / ".a.lock").exists()  # the lock file stays beside a run


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = textwrap.dedent(
        f"""
        import sys
        from treegrpo.config import TrainConfig
        from treegrpo.rundir import RunDir
        rd = RunDir({str(run)!r})
        rd.open(TrainConfig().to_dict())
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the parent closes our stdin
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as caught:
            RunDir(run).open(config())
        message = str(caught.value)
        assert f"pid {child.pid} on host {socket.gethostname()}, started 20" in message
        assert "in use by another run" in message and "\n" not in message
        assert not run.exists()
        child.communicate(timeout=30)  # closes its stdin: the holder exits
    # the holder has exited (the kernel released its lock): the directory is free again
    rd = RunDir(run)
    rd.open(config())
    rd.close()


def test_the_lock_is_per_directory_and_follows_symlinks(tmp_path):
    first = RunDir(tmp_path / "a")
    first.open(config())
    other = RunDir(tmp_path / "b")
    other.open(config())  # another directory: not blocked
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    with pytest.raises(RunDirError, match="in use by another run"):
        RunDir(tmp_path / "link").open(config())
    first.close()
    other.close()


def test_resume_never_refuses_a_directory_that_holds_a_run_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    run_id = make_run(run, config())
    before = tree_digest(run)
    with pytest.raises(RunDirError) as caught:
        RunDir(run, resume="never").open(config(resume="never"))
    message = str(caught.value)
    assert f"holds run {run_id}" in message and "last checkpoint at step 2" in message
    assert "trainer.resume=replace" in message and "trainer.resume=auto" in message
    assert tree_digest(run) == before
    fresh = RunDir(tmp_path / "empty", resume="never")  # an empty directory is fine
    (tmp_path / "empty").mkdir()
    fresh.open(config(resume="never"))
    fresh.close()


def test_resume_auto_refuses_an_incompatible_config_and_lists_what_differs(tmp_path):
    run = tmp_path / "run"
    make_run(run, config())
    before = tree_digest(run)
    changed = config()
    changed["model"]["path"] = "/models/other"
    changed["tree"]["m"] = 4
    with pytest.raises(RunDirError) as caught:
        RunDir(run).open(changed)
    message = str(caught.value)
    assert "model.path 'default' -> '/models/other'" in message
    assert "tree.m 2 -> 4" in message and "trainer.resume=replace" in message
    assert tree_digest(run) == before
    # settings that may change (longer run, other loggers, servers) continue the run
    longer = config(total_steps=10, logger=["jsonl"])
    longer["learner"]["total_steps"] = 10
    longer["engine"]["kv_budget_tokens"] = 1000
    rd = RunDir(run)
    rd.open(longer)
    assert rd.continuing
    notes = rd.commit(longer, step=2)
    assert any("trainer.total_steps 3 -> 10" in n for n in notes)
    assert json.loads((run / "config.json").read_text())["trainer"]["total_steps"] == 10
    assert json.loads((run / "run.json").read_text())["config"]["trainer"]["total_steps"] == 3
    rd.close()


def test_config_differences_compares_only_the_settings_both_sides_have():
    old, new = config(), config()
    del old["trainer"]["seed"]  # a setting an older version did not record
    new["tree"]["seed"] = 7
    new["learner"]["micro_batch_tokens"] = 512  # may change
    assert config_differences(old, new) == [("tree.seed", 0, 7)]
    assert config_differences(old, new, changeable=True) == [
        ("learner.micro_batch_tokens", 2048, 512)
    ]


def test_resume_replace_replaces_a_run_whole_at_commit_only(tmp_path):
    run = tmp_path / "run"
    old_id = make_run(run, config())
    (run / "nodes" / "step=000002").mkdir(parents=True)
    (run / "nodes" / "step=000002" / "part-0.parquet").write_bytes(b"old")
    before = tree_digest(run)
    other = config(resume="replace")
    other["tree"]["m"] = 4
    rd = RunDir(run, resume="replace")
    rd.open(other)
    assert tree_digest(run) == before  # set-up could still fail: nothing replaced yet
    rd.close()
    assert tree_digest(run) == before
    rd = RunDir(run, resume="replace")
    rd.open(other)
    rd.commit(other)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "run.json"]
    assert json.loads((run / "run.json").read_text())["run_id"] not in ("", old_id)
    assert not list(tmp_path.glob(".run.replaced-*"))
    rd.close()


def test_an_interrupted_replace_leaves_no_mix_and_its_leftover_goes(tmp_path):
    # a kill between "rename the old run aside" and "delete it" leaves it beside the new run
    run = tmp_path / "run"
    make_run(run, config())
    aside = tmp_path / ".run.replaced-0123"
    os.rename(run, aside)
    rd = RunDir(run)
    rd.open(config())
    assert not rd.continuing  # the name holds nothing: a new run, never the old one's files
    rd.commit(config())
    assert not aside.exists()
    rd.close()


def test_foreign_files_are_neither_continued_nor_replaced(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    for mode in ("auto", "never", "replace"):
        with pytest.raises(RunDirError, match=r"not a treegrpo run.*thesis\.tex"):
            RunDir(home, resume=mode).open(config(resume=mode))
    assert (home / "thesis.tex").read_text() == "precious"


def test_empty_run_dir_and_a_file_are_refused_and_tilde_is_expanded(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"trainer\.run_dir must name a directory"):
        load_config(None, ["trainer.run_dir="])
    with pytest.raises(ConfigError, match=r"trainer\.run_dir must name a directory"):
        load_config(None, ["trainer.run_dir='  '"])
    with pytest.raises(RunDirError, match="is empty"):
        RunDir("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunDir(tmp_path / "file").open(config())
    monkeypatch.setenv("HOME", str(tmp_path))
    rd = RunDir("~/runs/a")
    assert rd.path == tmp_path / "runs" / "a"
    rd.open(config())
    rd.commit(config())
    rd.close()
    assert (tmp_path / "runs" / "a" / "run.json").is_file()
    assert not Path("~").exists()  # no directory literally named "~"


def test_continuing_removes_only_our_temporaries_and_later_partitions(tmp_path):
    run = tmp_path / "run"
    make_run(run, config(), step=2)
    ours = [
        run / "checkpoints" / ".step_000003.k2j4h1" / "model.safetensors",  # a killed save
        run / "nodes" / "step=000002" / ".part-0.parquet.x81ja.tmp",  # a killed Parquet write
        run / "trajectories" / "step=000001" / ".part-1.parquet.0a9s.tmp",
        run / ".metrics.jsonl.7hw2.tmp",  # a killed rewrite of metrics.jsonl
    ]
    kept = [
        run / "nodes" / "step=000002" / "part-0.parquet",
        run / "trajectories" / "step=000001" / "part-1.parquet",
        run / "checkpoints" / "notes.txt",  # not ours: left alone
        run / ".scratch.tmp",
        run / "nodes" / "step=000002" / "mine.tmp",
    ]
    later = run / "trajectories" / "step=000003" / "part-0.parquet"  # rolled out again
    for p in [*ours, *kept, later]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    rd = RunDir(run)
    rd.open(config())
    assert all(p.exists() for p in ours)  # nothing removed before set-up passed
    notes = rd.commit(config(), step=2)
    rd.close()
    assert not any(p.exists() for p in ours)
    assert not (run / "checkpoints" / ".step_000003.k2j4h1").exists()
    assert all(p.exists() for p in kept)
    assert not later.parent.exists()
    assert any("removed 4 temporaries" in n for n in notes)
    assert any("1 steps after step 2" in n for n in notes)


def test_a_run_of_an_older_version_is_adopted_from_its_config_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config()))
    (run / "metrics.jsonl").write_text("")
    changed = config()
    changed["tree"]["n"] = 3
    with pytest.raises(RunDirError, match=r"tree\.n 2 -> 3"):
        RunDir(run).open(changed)
    rd = RunDir(run)
    rd.open(config())
    assert rd.continuing
    rd.commit(config())
    rd.close()
    assert json.loads((run / "run.json").read_text())["config"] == json.loads(json.dumps(config()))
