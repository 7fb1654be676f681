"""Training against an SGLang server (the stand-in) that restarts mid-rollout: it comes back with
its base weights, and no step trains on completions from them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("torch")

from sglang_helpers import sglang_train_settings
from treegrpo.config import load_config
from treegrpo.testing.sglang_standin import start_standin_server
from treegrpo.train import Trainer


def test_a_server_restarted_mid_rollout_never_feeds_a_step_its_base_weights(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "cache"))
    first, url, stop_first = start_standin_server(str(tiny_dir), decode_chunk=1)
    port = int(url.rsplit(":", 1)[1])
    stops = [stop_first]
    run = tmp_path / "run"
    extra = {"tree.max_action_tokens": "24", "engine.retry_window_s": "20"}
    settings = sglang_train_settings(url, run, tiny_dir, extra)
    cfg = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    killed = threading.Event()

    def restart_mid_rollout() -> None:
        deadline = time.monotonic() + 120
        while not first.in_flight() and time.monotonic() < deadline:
            time.sleep(0.001)
        stop_first()  # killed with requests running
        killed.set()
        time.sleep(0.3)
        _, _, stop = start_standin_server(str(tiny_dir), port=port, decode_chunk=1)
        stops.append(stop)

    try:
        with Trainer(cfg, progress=False) as trainer:
            trainer.setup()
            trainer.train_step()  # step 1, from version "0" (pushed at setup)
            trainer.step += 1
            watcher = threading.Thread(target=restart_mid_rollout, daemon=True)
            watcher.start()
            trainer.train_step()  # step 2: the server dies and comes back mid-rollout
            trainer.step += 1
            watcher.join(timeout=30)
            assert killed.is_set(), "the server was never caught with requests in flight"
            repushes = trainer.engine.weight_repushes
    finally:
        for stop in stops:
            stop()
    assert repushes == 1
    for step, version in ((1, "0"), (2, "1")):
        nodes = pl.read_parquet(run / "nodes" / f"step={step:06d}" / "part-0.parquet")
        assert set(nodes["weight_version"].drop_nulls().to_list()) == {version}, step
