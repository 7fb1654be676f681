"""Helpers shared by the tests that run the SGLang client against the stand-in server: a
stand-in on a thread that can be killed and restarted on its port, an engine wrapper that
records what was asked and answered, and the trainer settings for a tiny run against a server.

(The ``make_standin`` fixture over :class:`Standin` is in conftest.py.)"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from treegrpo.engine.base import Completion, GenerateRequest
from treegrpo.testing.sglang_standin import SGLangStandin, start_standin_server


class Standin:
    """A stand-in server on a thread: ``url``, ``port``, the ``server`` object; ``stop()``
    kills it (once; again is a no-op), ``restart()`` brings a fresh one (empty cache, the
    model's current weights) up on the same port."""

    def __init__(self, policy: tuple[Any, Any], port: int = 0, **options: Any) -> None:
        self.policy, self.options = policy, options
        self.server: SGLangStandin
        self.server, self.url, self._stop = start_standin_server(policy, port=port, **options)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._stop()

    def restart(self) -> None:
        self.server, self.url, self._stop = start_standin_server(
            self.policy, port=self.port, **self.options
        )
        self.stopped = False


class Recorder:
    """An engine wrapper that records every request with its completions."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[tuple[GenerateRequest, list[Completion]]] = []

    @property
    def weight_version(self) -> str:
        return self.engine.weight_version

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Completion]]:
        out = await self.engine.generate(requests)
        self.calls.extend(zip(requests, out, strict=True))
        return out

    async def close(self) -> None:
        await self.engine.close()


def sglang_train_settings(
    url: str, run: Path, model_dir: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The settings of a tiny training run (the reference preset on the tiny random model in
    ``model_dir``, a few synthetic questions) against the SGLang server at ``url``, writing to
    ``run``; ``extra`` adds or overrides settings."""
    return {
        "preset": "smollm2",  # the reference settings, on a tiny random model
        "model.path": str(model_dir),
        "model.sft_steps": "0",
        "data.synth_docs": "80",
        "data.synth_train": "16",
        "data.synth_test": "8",
        "data.val_size": "2",
        "data.train_batch_size": "2",
        "tree.max_action_tokens": "16",
        "env.max_obs_tokens": "48",
        "engine.kind": "sglang",
        "engine.urls": f"[{url}]",
        "trainer.run_dir": str(run),
        "trainer.logger": "[jsonl]",
        "trainer.val_before": "false",
        "trainer.val_after": "false",
        **(extra or {}),
    }
