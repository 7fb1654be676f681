"""Each engine's weight sync behind the engine interface (engine/base.py: WeightSync): what the
trainer calls, without asking which kind of engine it holds."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from treegrpo.engine.base import PolicySource
from treegrpo.engine.embedded import EmbeddedEngine
from treegrpo.engine.sglang_weights import SGLangWeightSync
from treegrpo.testing.tiny import tiny_policy


def source_for(model: Any, tokenizer: Any, tmp_path: Path, **options: Any) -> PolicySource:
    return PolicySource(
        model=model,
        tokenizer=tokenizer,
        state_dict=lambda every_rank: dict(model.state_dict()),
        directory=tmp_path / "weights",
        **options,
    )


def test_shared_weights_bump_in_the_learners_step_and_push_nothing(tmp_path):
    model, tokenizer = tiny_policy()
    engine = EmbeddedEngine(model, tokenizer)
    sync = engine.weight_sync(source_for(model, tokenizer, tmp_path))
    assert sync.keeps_state
    assert sync.on_step is not None and sync.hold is not None
    with sync.hold():
        assert sync.on_step() == "1"
    sync.push(1)  # shared: the version was bumped by on_step already
    assert engine.weight_version == "1"
    sync.weights_loaded()  # a checkpoint changed the weights under the cache
    assert engine.weight_version == "2"
    state = sync.state_dict()
    assert state["weight_version"] == 2
    engine.bump_weight_version()
    sync.load_state_dict(state)
    assert engine.weight_version == "2"


def test_a_replica_gets_the_learners_weights_on_push(tmp_path):
    model, tokenizer = tiny_policy()
    replica = copy.deepcopy(model).to(torch.bfloat16)
    engine = EmbeddedEngine(replica, tokenizer)
    sync = engine.weight_sync(source_for(model, tokenizer, tmp_path, sharded=True))
    assert sync.on_step is None and sync.hold is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    sync.push(1)
    assert engine.weight_version == "1"
    theirs = replica.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    for name, ours in model.state_dict().items():
        assert theirs[name].dtype == torch.bfloat16, name
        assert torch.equal(theirs[name], ours.to(torch.bfloat16)), name
    sync.weights_loaded()  # sharded: the next push refreshes (and bumps) the replica
    assert engine.weight_version == "1"


class _Recorder:
    """Stands in for the client and the policy: records what the sync asks of them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def update_weights_from_disk(self, path: str, *, weight_version: str) -> None:
        self.calls.append(("update", path, weight_version))

    def save_pretrained(self, path: Path, **options: Any) -> None:
        self.calls.append(("save", Path(path), options.get("state_dict")))


@pytest.mark.parametrize("is_main", [True, False])
def test_sglang_servers_get_the_policy_from_disk_on_rank_0_only(tmp_path, is_main):
    log = _Recorder()
    barriers: list[int] = []
    source = PolicySource(
        model=log,
        tokenizer=log,
        state_dict=lambda every_rank: {"w": every_rank},
        directory=tmp_path / "w",
        sharded=True,
        is_main=is_main,
        barrier=lambda: barriers.append(1),
        run=asyncio.run,
    )
    sync = SGLangWeightSync(log, source)  # type: ignore[arg-type]
    assert not sync.keeps_state and sync.on_step is None and sync.hold is None
    sync.push(7)
    expected = (
        [
            ("save", tmp_path / "w", {"w": False}),  # gathered to rank 0 (FSDP2)
            ("save", tmp_path / "w", None),  # the tokenizer
            ("update", str(tmp_path / "w"), "7"),
        ]
        if is_main
        else []
    )
    assert log.calls == expected
    assert barriers == [1]
    sync.weights_loaded()
    assert sync.state_dict() is None
