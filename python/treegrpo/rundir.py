"""Run directories: one directory holds one run, and one process at a time writes it.

A run directory holds ``run.json`` (the run's id, when and where it was created, and the
config it was created with; written once), ``config.json`` (the config of the latest start),
``metrics.jsonl``, the rollout logs (``nodes/``, ``trajectories/``) and ``checkpoints/``.

1. **A lock.** A run holds an exclusive ``flock`` on ``<parent>/.<name>.lock``, beside the
   directory, from the start of set-up to its end; a second run on the same directory fails
   at once, naming the holder (pid, host, start time). The lock sits beside the directory so
   that the directory holds only the run and a replacement keeps the lock. The kernel drops it
   when the process dies: a killed run never leaves a stale lock. (POSIX only; on a network
   filesystem it is only as good as the filesystem's ``flock``.)
2. **Nothing before set-up has passed.** :meth:`RunDir.open` only reads the directory (and
   takes the lock); :meth:`RunDir.commit`, called once the data, policy, engine, environment
   and learner are built, creates the directory and writes ``run.json`` and ``config.json``
   (each atomically: a temporary file, then a rename). A run that fails during set-up leaves
   the directory as it found it.
3. **``trainer.resume``.** ``auto``: an empty or missing directory starts a run; a directory
   holding a run continues it if the recorded config is compatible (only the settings of
   :data:`MAY_CHANGE` may differ); otherwise it is refused, every difference listed.
   ``never``: starts a run; a directory that holds anything is refused. ``replace``: starts a
   run; a directory holding a treegrpo run is replaced whole at commit (renamed aside, the new
   one created, the old one deleted; at every moment the name holds the old run whole, nothing,
   or the new run), and a directory holding anything else is refused: treegrpo deletes only
   its own runs.
4. **After a kill.** On continuing, commit deletes what a killed process left: checkpoint
   temporaries (``checkpoints/.step_*``), Parquet temporaries (``.part-*.parquet.*.tmp``),
   those of the atomic text writes, and the rollout-log partitions of steps after the
   checkpoint it resumes from (they are rolled out again), each only by its pattern.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

from treegrpo.exceptions import RunDirError

__all__ = ["MAY_CHANGE", "RunDir", "config_differences"]

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"

# Settings that may differ when a run is continued: how long it runs, what it logs, how often
# it validates and checkpoints, where and with what memory it computes. None changes what the
# run learns from or how; every other setting must equal the run's recorded one. A name that
# ends in "." covers a whole section. learner.total_steps follows trainer.total_steps unless
# set: extending a run with warmup_ratio > 0 stretches its warmup (the resume note says so).
MAY_CHANGE = (
    "trainer.total_steps",
    "trainer.run_dir",
    "trainer.resume",
    "trainer.logger",
    "trainer.save_every",
    "trainer.val_before",
    "trainer.val_after",
    "trainer.val_every",
    "trainer.plot",
    "learner.total_steps",
    "learner.micro_batch_tokens",
    "learner.logprob_chunk_tokens",
    "learner.gradient_checkpointing",
    "learner.strategy",
    "learner.max_nonfinite_updates",
    "model.device",
    "env.retriever_url",
    "engine.",
)
_SHOWN_DIFFERENCES = 6


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def config_differences(
    recorded: dict[str, Any], current: dict[str, Any], *, changeable: bool = False
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, current)`` for every setting that differs between two configs (as
    ``TrainConfig.to_dict()`` gives them), among the ones that must match (``changeable=False``)
    or the ones of :data:`MAY_CHANGE`. A key that only one side has (a setting added or removed
    by another treegrpo version) is not compared."""
    old = _flat(json.loads(json.dumps(recorded, default=str)))
    new = _flat(json.loads(json.dumps(current, default=str)))
    return [
        (key, old[key], new[key])
        for key in old
        if key in new and old[key] != new[key] and _may_change(key) == changeable
    ]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _shown(differences: list[tuple[str, Any, Any]]) -> str:
    parts = [f"{k} {old!r} -> {new!r}" for k, old, new in differences[:_SHOWN_DIFFERENCES]]
    more = len(differences) - _SHOWN_DIFFERENCES
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class RunDir:
    """The run directory of one run (see the module docstring): :meth:`open` before set-up,
    :meth:`commit` once it has passed, :meth:`close` at the end (releases the lock).

    After :meth:`open`: ``continuing`` (this run continues the one in the directory) and
    ``record`` (``run.json``'s content: ``run_id``, ``created``, ``host``, ``config``)."""

    def __init__(self, path: str | os.PathLike[str], *, resume: str = "auto") -> None:
        text = str(path).strip()
        if not text:
            raise RunDirError("trainer.run_dir is empty: name a directory, e.g. runs/a")
        self.path = Path(text).expanduser()
        self.resume = resume
        self.continuing = False
        self.record: dict[str, Any] = {}
        self.changed: list[tuple[str, Any, Any]] = []  # MAY_CHANGE settings that differ
        self._replace = False
        self._fd: int | None = None
        self._real = self.path.absolute()

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id", ""))

    @property
    def lock_path(self) -> Path:
        return self._real.parent / f".{self._real.name}.lock"

    # ------------------------------------------------------------------ before set-up

    def open(self, config: dict[str, Any]) -> None:
        """Take the lock and decide what this run does with the directory, given its config
        (``TrainConfig.to_dict()``). Writes nothing into the directory. Raises
        :class:`RunDirError` (the lock is then released)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(
                f"trainer.run_dir {self.path} is a file, not a directory: choose another "
                "trainer.run_dir"
            )
        self._real = self.path.resolve()  # symlinks followed: one lock per real directory
        if not self._real.name:
            raise RunDirError(f"trainer.run_dir {self.path} is a filesystem root: name a directory")
        self._lock()
        try:
            self._decide(config)
        except BaseException:
            self.close()
            raise

    def _decide(self, config: dict[str, Any]) -> None:
        path = self.path
        entries = sorted(p.name for p in self._real.iterdir()) if self._real.is_dir() else []
        if not entries:
            self.record = self._new_record(config)
            return
        found = self._read_record()
        if found is None:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunDirError(
                f"trainer.run_dir {path} holds files that are not a treegrpo run ({shown}): "
                "choose another trainer.run_dir (treegrpo neither continues nor deletes them)"
            )
        what = self._describe(found)
        if self.resume == "never":
            raise RunDirError(
                f"trainer.run_dir {path} is not empty (it holds {what}) and trainer.resume=never "
                "starts a run only in an empty directory: set trainer.resume=auto to continue "
                "it, trainer.resume=replace to delete it and start over, or choose another "
                "trainer.run_dir"
            )
        if self.resume == "replace":
            self._replace = True
            self.record = self._new_record(config)
            return
        differences = config_differences(found["config"], config)
        if differences:
            raise RunDirError(
                f"trainer.run_dir {path} holds {what}, whose config differs: "
                f"{_shown(differences)} (recorded -> now). Restore those settings to continue "
                "it, choose another trainer.run_dir, or set trainer.resume=replace to delete it "
                "and start over"
            )
        if (self._real / "metrics.jsonl").exists():  # a bad line fails now, before set-up
            from treegrpo.logs.metrics import read_records

            with warnings.catch_warnings():  # a torn last line: the logger drops it and says so
                warnings.simplefilter("ignore", RuntimeWarning)
                read_records(self._real / "metrics.jsonl")
        self.record = found
        self.continuing = True
        self.changed = config_differences(found["config"], config, changeable=True)

    def _read_record(self) -> dict[str, Any] | None:
        """``run.json``; for a run of an older treegrpo, one made from its ``config.json``."""
        for name in (RUN_FILE, CONFIG_FILE):
            file = self._real / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise RunDirError(
                    f"{file} is not valid JSON ({e}): the run directory is damaged; repair the "
                    "file or choose another trainer.run_dir"
                ) from e
            if name == RUN_FILE and isinstance(data, dict) and isinstance(data.get("config"), dict):
                return data
            if name == CONFIG_FILE and isinstance(data, dict):
                return {"run_id": uuid.uuid4().hex, "created": None, "host": None, "config": data}
            raise RunDirError(f"{file} is not what treegrpo writes: choose another trainer.run_dir")
        return None

    def _describe(self, record: dict[str, Any]) -> str:
        from treegrpo.checkpoint import latest

        ckpt = latest(self._real)
        at = f"last checkpoint at step {int(ckpt.name.split('_')[1])}" if ckpt else "no checkpoint"
        created = f", created {record['created']} on {record['host']}" if record["created"] else ""
        return f"run {record['run_id']}{created}, {at}"

    @staticmethod
    def _new_record(config: dict[str, Any]) -> dict[str, Any]:
        return {
            "run_id": uuid.uuid4().hex,
            "created": _now(),
            "host": socket.gethostname(),
            "config": json.loads(json.dumps(config, default=str)),
        }

    # ------------------------------------------------------------------ the lock

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows): no lock, as documented
            return
        lock = self.lock_path
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create {lock.parent} for trainer.run_dir: {e}") from e
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot create the lock file {lock}: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(lock)
                os.close(fd)
                raise RunDirError(
                    f"trainer.run_dir {self.path} is in use by another run ({holder}; lock "
                    f"{lock}): wait for it to end, or choose another trainer.run_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: take the new one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def close(self) -> None:
        """Release the lock (a run that never committed also removes the lock file it made)."""
        if self._fd is None:
            return
        try:
            if not self._real.exists():
                self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ after set-up

    def commit(self, config: dict[str, Any], *, step: int = 0) -> list[str]:
        """Set-up has passed: create (or replace) the directory, record the run, write
        ``config.json``; when continuing from the checkpoint of `step`, delete what a killed
        process left (module docstring, 4.). Returns notes for the console."""
        from treegrpo.checkpoint import remove_temporaries as checkpoint_temporaries
        from treegrpo.logs.metrics import METRICS_FILE
        from treegrpo.logs.write import remove_steps_after, remove_temporaries, write_text_atomic

        if self._fd is None and self._can_lock():
            raise RunDirError("RunDir.commit before RunDir.open: the run directory is not locked")
        notes = []
        real = self._real
        for left in real.parent.glob(f".{real.name}.replaced-*"):  # an interrupted replace
            shutil.rmtree(left, ignore_errors=True)
        if self._replace and real.exists():
            aside = real.with_name(f".{real.name}.replaced-{self.run_id}")
            os.rename(real, aside)
            real.mkdir()
            shutil.rmtree(aside)
            notes.append(f"replaced the run that was in {self.path}")
        real.mkdir(parents=True, exist_ok=True)
        if not (real / RUN_FILE).exists():
            write_text_atomic(json.dumps(self.record, indent=2) + "\n", real / RUN_FILE)
        write_text_atomic(json.dumps(config, indent=2, default=str) + "\n", real / CONFIG_FILE)
        if self.continuing:
            removed = checkpoint_temporaries(real)
            removed += remove_temporaries(real, files=(METRICS_FILE, RUN_FILE, CONFIG_FILE))
            later = remove_steps_after(real, step)
            if removed:
                names = ", ".join(str(p.relative_to(real)) for p in removed[:3])
                notes.append(f"removed {len(removed)} temporaries of a killed run ({names}...)")
            if later:
                notes.append(f"removed the rollout logs of {len(later)} steps after step {step}")
            if self.changed:
                notes.append(f"settings changed since the run began: {_shown(self.changed)}")
        return notes

    @staticmethod
    def _can_lock() -> bool:
        try:
            import fcntl  # noqa: F401
        except ImportError:  # pragma: no cover
            return False
        return True


def _holder(lock: Path) -> str:
    """Who holds a lock file, from what it wrote in it."""
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
