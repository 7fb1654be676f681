"""Checkpoints: the policy in Hugging Face format (safetensors) plus everything needed to
continue exactly: optimizer, learner schedule position and counters, RNG states (Python,
NumPy, torch CPU and CUDA), and what the trainer passes in ``state`` (step, data cursor, the
embedded engines' sampling generators; docs/architecture.md, "Exact resume").

Layout: ``<run_dir>/checkpoints/step_000003/`` holding ``model.safetensors`` (+ config and
tokenizer files), ``trainer_state.pt`` and ``COMPLETE``. A checkpoint is written into a
temporary directory (``.step_000003.*``) and renamed into place, and the marker is written
last, so a process killed at any moment leaves either the previous checkpoint or the new one,
never half of one; :func:`remove_temporaries` deletes what a killed save left.

The weights are the full model and the optimizer state is keyed by parameter name, whatever
the data-parallel strategy: under FSDP2 every rank calls :func:`save` (the shards are gathered)
and rank 0 writes; :func:`load` gives every rank the full state and each keeps its shard. A
checkpoint therefore resumes under another strategy or number of processes.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from treegrpo.fsutil import atomic_directory

__all__ = ["latest", "load", "remove_temporaries", "save"]

MARKER = "COMPLETE"
_TEMPORARY = ".step_*.*"  # save's mkdtemp(prefix=".step_000003.")


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(
    run_dir: Path, step: int, model: Any, tokenizer: Any, learner: Any, state: dict[str, Any]
) -> Path | None:
    """Write the checkpoint of `step` atomically; older checkpoints but the previous one go.
    Every rank calls it; rank 0 writes and returns the path (the others return None)."""
    import numpy as np
    import torch

    from treegrpo.distributed import world

    model_state = learner.model_state_dict()  # FSDP2: gathered onto rank 0
    optimizer_state = learner.optimizer_state_dict()
    if not world().is_main:
        return None
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    with atomic_directory(final, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {
                **state,
                "optimizer": optimizer_state,
                "learner_steps": learner.steps,
                "learner_updates": learner.updates,
                "learner_skipped_updates": learner.skipped_updates,
                "learner_nonfinite_in_a_row": learner._nonfinite_in_a_row,
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    # only once CUDA is in use (reading it would initialise CUDA otherwise)
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                },
            },
            tmp / "trainer_state.pt",
        )
        (tmp / MARKER).write_text(str(step))
    for old in _complete(run_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary directories (``checkpoints/.step_*``) of saves that a killed process
    left behind (a model's weights plus optimizer state each); returns what was removed. Call
    it only while holding the run's lock (treegrpo.rundir): a live save's temporary looks the
    same."""
    root = _dir(run_dir)
    found = [p for p in root.glob(_TEMPORARY) if p.is_dir()] if root.is_dir() else []
    for p in found:
        shutil.rmtree(p)
    return found


def _complete(run_dir: Path) -> list[Path]:
    root = _dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = _complete(run_dir)
    return found[-1] if found else None


def load(path: Path, model: Any, learner: Any) -> dict[str, Any]:
    """Load weights, optimizer and RNG states from `path` into `model`/`learner` (the
    learner's model; sharded or not); returns the trainer state saved with it (step, data
    cursor, ...)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(file), device=str(next(model.parameters()).device)))
    # tied embeddings are saved once: only tied keys may be missing
    expected = set(model.state_dict())
    missing = {k for k in expected - set(weights) if "lm_head" not in k}
    unexpected = set(weights) - expected
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    learner.load_state_dicts(weights, state.pop("optimizer"))
    learner.steps = state.pop("learner_steps")
    learner.updates = state.pop("learner_updates")
    learner.skipped_updates = state.pop("learner_skipped_updates", 0)
    learner._nonfinite_in_a_row = state.pop("learner_nonfinite_in_a_row", 0)
    rng = state.pop("rng")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    # CUDA generators: restored onto the same number of GPUs; otherwise they keep their seed
    # (docs/architecture.md, "Exact resume", lists what is then not reproduced)
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state
