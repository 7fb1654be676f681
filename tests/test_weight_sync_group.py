"""``engine.weight_sync=distributed``: the trainer broadcasts its weights over a process group
that the SGLang stand-in joins (gloo on CPU, as NCCL on GPUs).

The stand-in receives with its own code (``join_weight_update_group`` and its receive path in
treegrpo.testing.sglang_standin), never the trainer's (treegrpo.engine.sglang_group), and the
tests read what it serves through SGLang's ``/get_weights_by_name`` with plain ``urllib``, not
through the client: what they compare is what the server holds against the learner's tensors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

torch = pytest.importorskip("torch")

from aiohttp import web  # noqa: E402
from sglang_helpers import sglang_train_settings  # noqa: E402
from treegrpo.config import load_config  # noqa: E402
from treegrpo.engine.base import PolicySource  # noqa: E402
from treegrpo.engine.errors import WeightSyncError  # noqa: E402
from treegrpo.engine.sglang_client import SGLangClient  # noqa: E402
from treegrpo.testing.sglang_standin import start_app_in_thread  # noqa: E402
from treegrpo.testing.tiny import tiny_policy  # noqa: E402
from treegrpo.train import Trainer  # noqa: E402


@pytest.fixture
def standin_process(tiny_dir: Path) -> Iterator[str]:
    """``python -m treegrpo.testing.sglang_standin`` serving the tiny policy, in its own process
    (it is another rank of the group: torch keeps group names per process)."""
    command = [sys.executable, "-m", "treegrpo.testing.sglang_standin", "--model", str(tiny_dir)]
    process = subprocess.Popen(
        [*command, "--port", "0", "--cache-tokens", "8192"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if "serving" in line:
            break
    else:
        process.wait(timeout=30)
        pytest.fail("the stand-in did not start:\n" + "".join(lines))
    url = next(w for w in lines[-1].split() if w.startswith("http://"))
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        yield url
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        reader.join(timeout=10)
        process.stdout.close()
    assert code == 0, "".join(lines)


def served(url: str, name: str) -> Any:
    """The parameter ``name`` the server at ``url`` serves, whole, as float32 (SGLang's
    ``/get_weights_by_name``)."""
    body = json.dumps({"name": name, "truncate_size": 1 << 30}).encode()
    request = urllib.request.Request(
        url + "/get_weights_by_name", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return torch.tensor(json.load(answer), dtype=torch.float32)


def server_version(url: str) -> str:
    with urllib.request.urlopen(url + "/server_info", timeout=60) as answer:
        return str(json.load(answer)["weight_version"])


def differences(url: str, model: Any) -> list[str]:
    """The learner's parameters that the server does not hold exactly."""
    return [
        name
        for name, p in model.named_parameters()
        if not torch.equal(served(url, name), p.detach().to(torch.float32))
    ]


def snapshot(model: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def settings(url: str, run: Path, policy_dir: Path) -> dict[str, str]:
    return sglang_train_settings(url, run, policy_dir, {"engine.weight_sync": "distributed"})


def test_two_training_steps_sync_the_weights_over_a_gloo_group(
    standin_process: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    url = standin_process
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    # the policy the trainer starts from differs from the tiny one the stand-in loaded, so the
    # first sync (at set-up) has something to send
    start, tokenizer = tiny_policy(seed=7)
    start_dir = tmp_path / "start"
    start.save_pretrained(start_dir)
    tokenizer.save_pretrained(start_dir)
    assert differences(url, start) != []  # the server does not hold them yet
    cfg = load_config(None, [f"{k}={v}" for k, v in settings(url, run, start_dir).items()])

    with Trainer(cfg, progress=False) as trainer:
        trainer.setup()
        model = trainer.model
        assert trainer.engine.weight_sync_kind == "distributed"
        assert differences(url, model) == [] and server_version(url) == "0"
        before = snapshot(model)
        for step in (1, 2):
            trainer.train_step()
            trainer.step += 1
            after = snapshot(model)
            changed = [n for n in after if not torch.equal(after[n], before[n])]
            assert changed, "the update changed no weight: the check below would be vacuous"
            assert differences(url, model) == [], step  # every tensor, exactly
            assert server_version(url) == str(step)
            before = after
        [group] = trainer.engine._groups
    # closing the trainer had the server leave the group: it has none of that name left
    body = json.dumps({"group_name": group.group_name}).encode()
    request = urllib.request.Request(url + "/destroy_weights_update_group", data=body)
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(request, timeout=60)
    for step, version in ((1, "0"), (2, "1")):  # each rollout ran on the weights synced before
        nodes = pl.read_parquet(run / "nodes" / f"step={step:06d}" / "part-0.parquet")
        assert set(nodes["weight_version"].drop_nulls().to_list()) == {version}, step
    assert not (run / "weights").exists()  # nothing went through disk


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    return s, int(s.getsockname()[1])


class RefusingSGLang:
    """A server that answers health and info but refuses to join a weight-update group."""

    def __init__(self, server_info: dict[str, Any] | None = None) -> None:
        self.info = server_info or {}
        self.calls: list[str] = []
        app = web.Application()
        app.router.add_get("/health", self._ok)
        app.router.add_get("/server_info", self._server_info)
        app.router.add_post("/init_weights_update_group", self._refuse)
        self.url, self.stop = start_app_in_thread(app, shutdown_timeout=0.1)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info)

    async def _refuse(self, request: web.Request) -> web.Response:
        self.calls.append(request.path)
        message = "Failed to initialize custom process group: connection timed out."
        return web.json_response({"success": False, "message": message}, status=400)


def _sync_for(
    url: str, loop: asyncio.AbstractEventLoop, gathered: dict[str, Any] | None = None
) -> Any:
    """A client and its group sync for the tiny policy; with ``gathered``, as under FSDP2:
    the policy is sharded and its full weights are what ``state_dict`` gathers."""
    model, tokenizer = tiny_policy(seed=0)
    client = SGLangClient(url, tokenizer=tokenizer, weight_sync="distributed")
    source = PolicySource(
        model=model,
        tokenizer=tokenizer,
        state_dict=lambda every_rank: dict(model.state_dict()) if gathered is None else gathered,
        directory=Path("/nonexistent"),
        sharded=gathered is not None,
        run=loop.run_until_complete,
    )
    return client, client.weight_sync(source)


def test_a_server_that_refuses_the_group_fails_at_once_saying_what_to_check():
    server = RefusingSGLang()
    loop = asyncio.new_event_loop()
    try:
        client, sync = _sync_for(server.url, loop)
        with pytest.raises(WeightSyncError, match="could not join the weight-update group") as e:
            sync.start()  # returns on the refusal, not after the group's timeout
        message = str(e.value)
        assert "connection timed out" in message  # the server's own reason
        assert "engine.sync_address" in message and "engine.weight_sync=disk" in message
        assert server.calls == ["/init_weights_update_group"]
        loop.run_until_complete(client.close())
    finally:
        loop.close()
        server.stop()


def test_data_parallel_servers_are_refused_before_any_group_is_asked_for():
    server = RefusingSGLang({"tp_size": 1, "dp_size": 2})
    loop = asyncio.new_event_loop()
    try:
        client, sync = _sync_for(server.url, loop)
        with pytest.raises(WeightSyncError, match=r"runs dp_size=2.*its own server"):
            sync.start()
        assert server.calls == []
        loop.run_until_complete(client.close())
    finally:
        loop.close()
        server.stop()


def test_a_port_in_use_fails_at_setup_and_leaves_the_run_directory_untouched(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from treegrpo.testing.sglang_standin import start_standin

    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "cache"))
    url, stop = start_standin(str(tiny_dir))
    holder, port = _busy_port()
    run = tmp_path / "run"
    overrides = {**settings(url, run, tiny_dir), "engine.sync_port": str(port)}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    try:
        with Trainer(cfg, progress=False) as trainer:
            with pytest.raises(WeightSyncError, match=f"port {port}.*engine.sync_port"):
                trainer.setup()
    finally:
        holder.close()
        stop()
    assert not run.exists()  # set-up had not passed: nothing was written


def test_a_sharded_policy_sends_its_gathered_weights_then_a_refused_update_breaks_the_group(
    standin_process: str,
):
    """As under FSDP2, the full weights ``state_dict`` gathers are sent (not the model's own
    parameters, its shards). Then the stand-in refuses an update (it knows no such group): the
    broadcast waiting for it stops on the refusal, and the next push says the group is
    broken."""
    url = standin_process
    full = {name: torch.randn_like(p) for name, p in tiny_policy(seed=0)[0].state_dict().items()}
    loop = asyncio.new_event_loop()
    try:
        client, sync = _sync_for(url, loop, gathered=full)
        sync.timeout = 10.0  # the abandoned broadcast fails on its own after this
        sync.start()
        sync.push(1)
        names = [name for name, _ in sync.source.model.named_parameters()]
        assert all(torch.equal(served(url, name), full[name]) for name in names)
        sync.group_name = "not-the-group"  # what the servers are told to receive over
        with pytest.raises(WeightSyncError, match="broke during the sync of version '2'") as e:
            sync.push(2)
        assert "no process group 'not-the-group'" in str(e.value)
        assert "Restart the servers and the run" in str(e.value)
        with pytest.raises(WeightSyncError, match="broke during the sync of version '2'"):
            sync.push(3)  # at once: the group is unusable
        loop.run_until_complete(client.close())
    finally:
        loop.close()


def test_the_client_refuses_an_unknown_sync_and_sync_settings_it_would_not_use():
    from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError

    with pytest.raises(InvalidOptionError, match="weight_sync must be one of"):
        SGLangClient("http://127.0.0.1:1", vocab_size=10, weight_sync="nccl")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"only apply to weight_sync=.distributed"):
        SGLangClient("http://127.0.0.1:1", vocab_size=10, sync_port=29600)


def test_the_default_address_is_loopback_for_a_local_server():
    from treegrpo.engine.sglang_group import local_address_towards

    for url in ("http://127.0.0.1:30000", "http://localhost:30000", "http://[::1]:30000"):
        assert local_address_towards(url) == "127.0.0.1"
