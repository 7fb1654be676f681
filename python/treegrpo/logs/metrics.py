"""Training metrics: to the console, ``metrics.jsonl``, TensorBoard and Weights & Biases.

A record is ``{"step": N, name: value, ...}``: the metrics of training step N (with those of
a validation run after it, under ``trainer.val_every``), or of a validation run alone after
step N (only ``val-core/*`` names and ``timing_s/validate``; :func:`record_kind`). Each
(step, kind) is recorded once:

- On resume from the checkpoint of step S, the records of steps after S are dropped (those steps
  run again) and the file is rewritten atomically (a temporary file, then a rename), so a kill
  at any moment leaves the old history or the new one. A validation already recorded for a
  step is not run again (:meth:`MetricsLogger.has`): a kill after the pre-training validation,
  or a re-run of a finished run, adds no second line.
- A torn last line (a kill mid-write) is dropped with a warning; a bad line elsewhere is an
  error naming its line number (nothing is dropped silently).
- TensorBoard (``run_dir/tensorboard``): a resumed writer purges the events of steps after S
  (``SummaryWriter(purge_step=S + 1)``). Weights & Biases (``run_dir/wandb``, the run's id as
  the W&B run id, ``resume="allow"``; ``WANDB_MODE=offline`` logs offline and
  ``WANDB_PROJECT`` names the project, default ``treegrpo``): W&B keeps the first copy of a
  step it already holds, which, as resume is exact, differs from the new one in timings only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

from treegrpo.exceptions import MissingDependencyError, RunFormatError
from treegrpo.logs.write import write_text_atomic

__all__ = ["SINKS", "MetricsLogger", "check_sinks", "read_records", "record_kind"]

SINKS = ("console", "jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
# sink -> (the module it imports, the extra that installs it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
_CONSOLE = ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "timing_s/step")


def check_sinks(sinks: list[str]) -> None:
    """Raise :class:`MissingDependencyError` for a logger whose package is not installed (call
    it before anything slow loads)."""
    for sink in sinks:
        if sink not in SINKS:
            raise ValueError(f"unknown logger {sink!r}: use any of {', '.join(SINKS)}")
        if sink in _PACKAGES:
            module, extra = _PACKAGES[sink]
            if importlib.util.find_spec(module) is None:
                raise MissingDependencyError(
                    f"trainer.logger includes {sink}, but the {module} package is not installed: "
                    f"pip install 'treegrpo[{extra}]' (or pip install {module}), or drop {sink} "
                    "from trainer.logger"
                )


def record_kind(record: dict[str, Any]) -> str:
    """``"val"`` for a validation's own record (nothing but ``val-core/*`` and
    ``timing_s/validate``), ``"train"`` for a training step's (validation metrics may ride
    along)."""
    names = [k for k in record if k != "step"]
    alone = all(k.startswith("val-core/") or k == "timing_s/validate" for k in names)
    return "val" if names and alone else "train"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A last line that is not a complete record (a kill
    mid-write) is dropped with a RuntimeWarning; a bad line elsewhere raises
    :class:`RunFormatError` naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except ValueError:
            ok = False
        if ok:
            records.append(record)
        elif number == len(lines):
            warnings.warn(
                f"{path}: dropped its torn last line {number} (a process killed while writing "
                f"it): {line[:80]!r}",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            raise RunFormatError(
                f"{path} line {number} is not a metrics record ({line[:80]!r}): repair or delete "
                "that line, then start again"
            )
    return records


class MetricsLogger:
    """Metrics of one run to its `sinks` (any of :data:`SINKS`). ``run_dir=None``: a null
    logger (the other ranks of a data-parallel run), which reads and writes nothing.

    ``resume_step``: the step the run continues from (0 for a new run): records of later steps
    are dropped (see the module docstring). ``run_id`` and ``config``: the run's identity and
    settings, for W&B. Construct it only once the run directory is the run's (after
    :meth:`treegrpo.rundir.RunDir.commit`)."""

    def __init__(
        self,
        run_dir: Path | None,
        sinks: list[str],
        *,
        resume_step: int = 0,
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.records: list[dict[str, Any]] = []
        self._index: dict[tuple[int, str], int] = {}
        self._tb: Any = None
        self._wandb: Any = None
        self.sinks: list[str] = [] if run_dir is None else list(sinks)
        if run_dir is None:
            return
        check_sinks(self.sinks)
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / METRICS_FILE
        if self.jsonl.exists():  # whatever the sinks: the file is the run's record
            old = self.jsonl.read_text(encoding="utf-8", errors="replace")
            for record in read_records(self.jsonl):
                if record["step"] <= resume_step:
                    self._remember(record)
            if self._text() != old:
                write_text_atomic(self._text(), self.jsonl)
        if "tensorboard" in self.sinks:
            from torch.utils.tensorboard import SummaryWriter

            events = self.run_dir / "tensorboard"
            purge = resume_step + 1 if events.exists() else None
            self._tb = SummaryWriter(str(events), purge_step=purge)
        if "wandb" in self.sinks:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "treegrpo"),
                name=self.run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                config=config,
                settings=wandb.Settings(console="off"),
            )

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=kind is not None)

    def close(self, *, failed: bool = False) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def has(self, step: int, kind: str) -> bool:
        """Whether a record of `kind` (``"train"`` or ``"val"``) is there for `step`."""
        return (step, kind) in self._index

    def get(self, step: int, kind: str) -> dict[str, float]:
        """The metrics of the record of `kind` for `step` (KeyError if none)."""
        record = dict(self.records[self._index[(step, kind)]])
        record.pop("step")
        return record

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record `step`'s metrics in every sink (replacing a record of the same step and kind
        in ``metrics.jsonl``, so none appears twice)."""
        if "console" in self.sinks:
            parts = [f"{k}={metrics[k]:.4g}" for k in _CONSOLE if k in metrics]
            extra = [f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("val-core/")]
            print(f"step {step}: " + " ".join(parts + extra), flush=True)
        record = {"step": step, **metrics}
        if "jsonl" in self.sinks:
            if (step, record_kind(record)) in self._index:
                self._remember(record)
                write_text_atomic(self._text(), self.jsonl)
            else:
                self._remember(record)
                with self.jsonl.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def _remember(self, record: dict[str, Any]) -> None:
        key = (record["step"], record_kind(record))
        if key in self._index:
            self.records[self._index[key]] = record
        else:
            self._index[key] = len(self.records)
            self.records.append(record)

    def _text(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.records)
