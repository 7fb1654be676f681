"""The metrics logger: exactly-once records, torn lines, the atomic rewrite, and the
TensorBoard and Weights & Biases sinks read back from what they wrote (W&B offline)."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from treegrpo.exceptions import MissingDependencyError, RunFormatError
from treegrpo.logs import metrics as metrics_module
from treegrpo.logs.metrics import MetricsLogger, check_sinks, read_records


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def history(run: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, as they would be written."""
    return [{"step": s, "critic/score/mean": s / 10} for s in range(1, 4)] + [
        {"step": 3, "val-core/all/acc/mean@1": 0.5}
    ]


def write_history(run: Path, torn: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in history(run))
    (run / "metrics.jsonl").write_text(text + torn)


def test_resume_drops_later_steps_and_a_torn_last_line_with_a_warning(tmp_path):
    write_history(tmp_path, torn='{"step": 4, "critic/sco')
    with pytest.warns(RuntimeWarning, match=r"dropped its torn last line 5"):
        log = MetricsLogger(tmp_path, ["jsonl"], resume_step=2)
    assert lines(tmp_path / "metrics.jsonl") == history(tmp_path)[:2]
    assert log.has(2, "train") and not log.has(3, "train") and not log.has(3, "val")
    log.write(3, {"critic/score/mean": 0.3})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_bad_line_before_the_last_is_an_error_naming_it_and_nothing_is_rewritten(tmp_path):
    write_history(tmp_path)
    path = tmp_path / "metrics.jsonl"
    text = path.read_text().splitlines()
    text[1] = "not json"
    path.write_text("\n".join(text) + "\n")
    before = path.read_bytes()
    with pytest.raises(RunFormatError, match=r"metrics.jsonl line 2 is not a metrics record"):
        MetricsLogger(tmp_path, ["jsonl"], resume_step=1)
    assert path.read_bytes() == before


def test_the_rewrite_at_start_is_atomic(tmp_path, monkeypatch):
    write_history(tmp_path)
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes()

    def killed(fd: int) -> None:  # the process dies after writing the new text, before rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, ["jsonl"], resume_step=1)
    assert path.read_bytes() == before  # the history is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    MetricsLogger(tmp_path, ["jsonl"], resume_step=1)
    assert lines(path) == history(tmp_path)[:1]


def test_record_kinds():
    from treegrpo.logs.metrics import record_kind

    val = {"step": 3, "val-core/all/acc/mean@1": 0.5, "timing_s/validate": 1.0}
    assert record_kind(val) == "val"
    assert record_kind({"step": 3, "critic/score/mean": 0.1}) == "train"
    assert record_kind({**val, "critic/score/mean": 0.1}) == "train"  # trainer.val_every
    assert record_kind({"step": 3}) == "train"


def test_each_step_and_kind_is_recorded_once(tmp_path):
    write_history(tmp_path)
    log = MetricsLogger(tmp_path, ["jsonl"], resume_step=3)
    assert log.has(3, "val") and log.get(3, "val") == {"val-core/all/acc/mean@1": 0.5}
    log.write(3, {"val-core/all/acc/mean@1": 0.75})  # written again: replaces, never appends
    records = lines(tmp_path / "metrics.jsonl")
    assert len(records) == 4 and records[-1] == {"step": 3, "val-core/all/acc/mean@1": 0.75}
    # duplicates left by an older version are merged on start (the last one wins)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 2, "critic/score/mean": 9.0}) + "\n")
    MetricsLogger(tmp_path, ["jsonl"], resume_step=3)
    records = lines(path)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[1]["critic/score/mean"] == 9.0
    assert read_records(path) == records


def test_a_missing_logger_package_is_a_clear_error(monkeypatch):
    real = metrics_module.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("tensorboard", "wandb") else real(name, *args)

    monkeypatch.setattr(metrics_module.importlib.util, "find_spec", find_spec)
    for sink in ("tensorboard", "wandb"):
        with pytest.raises(MissingDependencyError, match=rf"pip install 'treegrpo\[{sink}\]'"):
            check_sinks(["jsonl", sink])
    check_sinks(["console", "jsonl"])


def test_tensorboard_event_files_hold_the_metrics_and_a_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"]) as log:
        for step in (1, 2, 3):
            log.write(step, {"critic/score/mean": step / 4, "actor/lr": 1e-6})
    # killed after step 3 with the checkpoint of step 2: step 3 runs again with new values
    with MetricsLogger(tmp_path, ["tensorboard"], resume_step=2) as log:
        log.write(3, {"critic/score/mean": 0.9, "actor/lr": 1e-6})
        log.write(4, {"critic/score/mean": 1.0, "actor/lr": 1e-6})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scores = [(e.step, e.value) for e in events.Scalars("critic/score/mean")]
    assert scores == [(1, 0.25), (2, 0.5), (3, pytest.approx(0.9)), (4, 1.0)]
    assert [e.step for e in events.Scalars("actor/lr")] == [1, 2, 3, 4]


def read_wandb_log(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``), read independently of wandb's
    own code: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log blocks of
    32 KiB holding chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)
    of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", "not a W&B transaction log"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_log(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a W&B run once they end with its exit record: ``run.finish()`` returns
    before W&B's service process has written everything down."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def wandb_history(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Step -> the metrics W&B recorded for it, over every offline run in `run_dir/wandb`."""
    out: dict[int, dict[str, Any]] = {}
    for file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in finished_wandb_log(file):
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                step = int(items.pop("_step"))
                out.setdefault(step, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")}
                )
    return out


def wandb_offline(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """W&B offline, its settings and caches under `home` (never the user's)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    wandb_offline(monkeypatch, tmp_path / "wandb-home")
    run = tmp_path / "run"
    run.mkdir()
    with MetricsLogger(run, ["wandb"], run_id="abc123", config={"tree": {"m": 2}}) as log:
        log.write(0, {"val-core/all/acc/mean@1": 0.25})
        log.write(1, {"critic/score/mean": 0.5, "actor/lr": 1e-6})
        log.write(1, {"val-core/all/acc/mean@1": 0.75})  # validation after step 1
        log.write(2, {"critic/score/mean": 1.0, "actor/lr": 2e-6})
    assert [p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")] == ["abc123"]
    assert wandb_history(run) == {
        0: {"val-core/all/acc/mean@1": 0.25},
        1: {"critic/score/mean": 0.5, "actor/lr": 1e-6, "val-core/all/acc/mean@1": 0.75},
        2: {"critic/score/mean": 1.0, "actor/lr": 2e-6},
    }
