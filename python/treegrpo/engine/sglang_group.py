"""Weight sync over a process group (``engine.weight_sync=distributed``): the trainer's side.

SGLang servers join a process group the trainer forms (``POST /init_weights_update_group``),
then receive every parameter the trainer broadcasts from its rank 0 while a
``POST /update_weights_from_distributed`` naming them (names, dtypes, shapes) is open. Nothing
is written to disk. :class:`SGLangGroupSync` is the client's
:class:`~treegrpo.engine.base.WeightSync` for it:

- :meth:`~SGLangGroupSync.start` (once, at set-up, before the run directory is written): reads
  each server's tensor-parallel size from ``/server_info`` (a server of G GPUs takes G ranks:
  SGLang's rank is ``rank_offset + tp_rank``), opens the group's store on this machine (a port
  in use fails here, before any server is asked), and asks the servers to join while rank 0
  joins. A server that refuses, or ranks that never arrive, fail with a
  :class:`~treegrpo.engine.errors.WeightSyncError` that says what to check.
- :meth:`~SGLangGroupSync.push` (after every update and once at set-up): the policy's
  parameters (under FSDP2 gathered to rank 0 first), broadcast in order while the HTTP call
  runs inside ``/pause_generation`` and ``/continue_generation``. The broadcasts are issued
  asynchronously and polled from the event loop, so a server that answers ``success: false``
  stops the wait at once rather than after the group's timeout.
- ``close()`` (through :meth:`SGLangClient.close`): the servers leave the group
  (``/destroy_weights_update_group``, best effort) and rank 0's side is destroyed.

Backend: NCCL when the policy lives on a GPU (each tensor broadcast from that GPU), gloo on CPU
(the stand-in's path in tests). Each tensor crosses in the policy's own dtype; the server casts
it to its own. The group is formed the way SGLang's servers form theirs (a TCP store and a named
group apart from any default group), with torch's ``_new_process_group_helper`` as SGLang does,
so both sides agree on the store's keys. The helper is written here, apart from the stand-in's
receiving side (``treegrpo.testing.sglang_standin``), which must not share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from treegrpo.engine.base import PolicySource
from treegrpo.engine.errors import (
    EngineError,
    ServerControlError,
    ServerUnavailableError,
    WeightSyncError,
)

if TYPE_CHECKING:
    from treegrpo.engine.sglang_client import SGLangClient

__all__ = ["GROUP_TIMEOUT_S", "SGLangGroupSync", "local_address_towards"]

logger = logging.getLogger("treegrpo.engine.sglang_client")

T = TypeVar("T")

GROUP_TIMEOUT_S = 300.0
"""Seconds rank 0 waits for the servers to join, and for any one broadcast to be received."""

# Tensors copied to the group's device (FSDP2's CPU state dict to the GPU) in flight at once.
_BUCKET_BYTES = 1 << 30
_POLL_S = 0.002

_CHECK = (
    "check that every server in engine.urls can reach {address}:{port} (engine.sync_address / "
    "engine.sync_port; a firewall, or an address of another interface), that it runs on the "
    "device the backend needs ({backend}: NCCL needs the servers and the policy on GPUs) and "
    "answers /init_weights_update_group (SGLang >= 0.4); or use engine.weight_sync=disk"
)


class SGLangGroupSync:
    """:class:`~treegrpo.engine.base.WeightSync` over a process group with SGLang servers (see
    the module docstring). The servers keep no sampling state for a checkpoint."""

    on_step = None
    hold = None
    keeps_state = False

    def __init__(
        self,
        client: SGLangClient,
        source: PolicySource,
        *,
        address: str | None = None,
        port: int = 0,
        timeout: float = GROUP_TIMEOUT_S,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise WeightSyncError(f"sync port must be in [0, 65535] (0: a free one), got {port}")
        self.client = client
        self.source = source
        self.address = address
        self.port = int(port)
        self.timeout = float(timeout)
        # Unique per sync: a process (a test session) may form several groups, and torch keeps
        # group names process-wide.
        self.group_name = f"treegrpo-weights-{secrets.token_hex(4)}"
        self.backend: str | None = None
        self.world_size = 0
        self._group: Any = None
        self._store: Any = None
        self._broken: str | None = None

    # ------------------------------------------------------------------ WeightSync

    def start(self) -> None:
        """Form the group (rank 0 only; the other ranks have nothing to do)."""
        if self.source.is_main and self._group is None:
            self.source.run(self.form())

    def push(self, version: int) -> None:
        source = self.source
        state = source.state_dict(False) if source.sharded else None  # a collective (FSDP2)
        if source.is_main:
            if self._group is None:
                source.run(self.form())
            source.run(self.send(self._named_tensors(state), str(version)))
        source.barrier()  # no rank rolls out before the servers hold the new weights

    def weights_loaded(self) -> None:
        """Nothing: the next :meth:`push` sends the loaded weights."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore (the servers sample unseeded)."""

    # ------------------------------------------------------------------ the group

    async def form(self) -> None:
        """Ask every server to join the group while rank 0 joins it (see the module docstring).

        Raises:
            WeightSyncError: the port is in use, a server refused or did not join in time.
        """
        import torch

        client = self.client
        await client.start()
        urls = list(client.control_urls)
        sizes = [await self._ranks_of(url) for url in urls]
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        world_size = 1 + sum(sizes)
        device = _policy_device(self.source.model)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.index is not None:
            torch.cuda.set_device(device)
        address = self.address or local_address_towards(urls[0])
        store = self._open_store(address)
        port = int(store.port)
        check = _CHECK.format(address=address, port=port, backend=backend)
        timeout = self.timeout
        joining = _in_daemon_thread(
            lambda: _join_group(store, backend, world_size, self.group_name, timeout),
            name="treegrpo-weight-group",
        )
        asking = asyncio.ensure_future(
            client.init_weights_update_group(
                address, port, offsets, world_size, group_name=self.group_name, backend=backend
            )
        )
        try:
            done, _ = await asyncio.wait(
                {joining, asking}, timeout=timeout + 30, return_when=asyncio.FIRST_EXCEPTION
            )
            if asking in done and asking.exception() is not None:
                error = asking.exception()
                assert error is not None
                raise WeightSyncError(
                    f"the SGLang servers could not join the weight-update group at "
                    f"{address}:{port} ({backend}, {world_size} ranks): {_reason(error)}; {check}"
                ) from error
            if joining in done and joining.exception() is not None:
                error = joining.exception()
                assert error is not None
                raise WeightSyncError(
                    f"the weight-update group at {address}:{port} ({backend}, {world_size} "
                    f"ranks) was not formed: {_reason(error)}; {check}"
                ) from error
            if len(done) < 2:
                raise WeightSyncError(
                    f"the weight-update group at {address}:{port} was not formed within "
                    f"{timeout + 30:.0f} s; {check}"
                )
        except BaseException:
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking
            self._store = None  # the daemon thread, if still waiting, ends at its timeout
            raise
        self._group = joining.result()
        self._store = store
        self.backend, self.world_size = backend, world_size
        self._device = device
        logger.info(
            "weight-update group %s formed: %s, %d ranks, at %s:%d",
            self.group_name,
            backend,
            world_size,
            address,
            port,
        )

    async def _ranks_of(self, url: str) -> int:
        """The ranks a server takes in the group: its tensor-parallel size (``/server_info``;
        1 when it does not say). A server with data- or pipeline-parallel replicas would give
        two workers one rank (SGLang ranks them ``rank_offset + tp_rank``): refused."""
        try:
            info = await self.client.server_info(url)
        except EngineError:
            info = {}
        sizes = {key: info.get(key, 1) for key in ("tp_size", "dp_size", "pp_size")}
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                sizes[key] = 1
        for key in ("dp_size", "pp_size"):
            if sizes[key] > 1:
                raise WeightSyncError(
                    f"SGLang server {url} runs {key}={sizes[key]}: its workers would share "
                    "ranks of the weight-update group (SGLang ranks them rank_offset + "
                    "tp_rank); serve each replica as its own server in engine.urls, or use "
                    "engine.weight_sync=disk"
                )
        return int(sizes["tp_size"])

    def _open_store(self, address: str) -> Any:
        """The group's TCP store on this machine (rank 0 hosts it), at ``self.port`` or a free
        port; a port in use fails here, before any server is asked to connect."""
        import torch.distributed as dist

        try:
            return dist.TCPStore(
                "0.0.0.0",
                self.port,
                is_master=True,
                timeout=datetime.timedelta(seconds=self.timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as e:
            where = f"port {self.port}" if self.port else "a free port"
            raise WeightSyncError(
                f"cannot open the weight-update group's store on {where} of this machine "
                f"({_reason(e)}): the port is in use or not allowed; set engine.sync_port to a "
                "free port (0 picks one; not torchrun's MASTER_PORT)"
            ) from e

    # ------------------------------------------------------------------ sending

    def _named_tensors(self, state: dict[str, Any] | None) -> list[tuple[str, Any]]:
        """The policy's parameters in ``named_parameters()`` order (tied weights once), from
        the model itself or, sharded, from the gathered full ``state``."""
        model = self.source.model
        if state is None:
            return [(name, p.detach()) for name, p in model.named_parameters()]
        names = [name for name, _ in model.named_parameters()]
        missing = [name for name in names if name not in state]
        if missing:
            raise WeightSyncError(
                f"the gathered state dict lacks {len(missing)} of the policy's parameters, "
                f"e.g. {missing[0]}: cannot send them over the weight-update group"
            )
        return [(name, state[name]) for name in names]

    async def send(self, tensors: Sequence[tuple[str, Any]], weight_version: str) -> None:
        """Broadcast ``tensors`` over the group while the servers receive them
        (``update_weights_from_distributed``, inside a pause).

        Raises:
            WeightSyncError: a server refused or failed, or a broadcast failed; the group is
                then unusable (the next push raises at once).
        """
        if self._broken is not None:
            raise WeightSyncError(self._broken)
        if self._group is None:
            raise WeightSyncError("the weight-update group is not formed: call start() first")
        meta = [(name, t.dtype, tuple(t.shape)) for name, t in tensors]
        http = asyncio.ensure_future(
            self.client.update_weights_from_distributed(meta, self.group_name, weight_version)
        )
        try:
            await self._broadcast(tensors, http)
            await http
        except BaseException as e:
            http.cancel()
            with contextlib.suppress(BaseException):
                await http
            self._broken = (
                f"the weight-update group {self.group_name} broke during the sync of "
                f"version {weight_version!r} ({_reason(e)}); the servers may hold a mix of two "
                "versions. Restart the servers and the run (it resumes from its last "
                "checkpoint), or use engine.weight_sync=disk"
            )
            if isinstance(e, asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise WeightSyncError(self._broken) from e

    async def _broadcast(
        self, tensors: Sequence[tuple[str, Any]], http: asyncio.Future[Any]
    ) -> None:
        """Issue every broadcast from a daemon thread and wait for them here. The thread,
        because NCCL connects at the first collective and blocks its caller until the servers
        connect, which they do only once the HTTP call has reached them: on the event loop's
        thread that would stall the call itself. The wait here, because a server that
        refuses must end it at once (the thread may be stuck until the group's timeout)."""
        group, device = self._group, self._device if self.backend == "nccl" else None
        issued: list[Any] = []  # the works, in order, appended by the thread
        issuing = _in_daemon_thread(
            lambda: _issue(group, device, tensors, issued, self.timeout),
            name="treegrpo-weight-broadcast",
        )
        while not issuing.done():
            await asyncio.wait({issuing, http}, return_when=asyncio.FIRST_COMPLETED)
            _raise_if_failed(http)
        issuing.result()  # the thread's own error (a broadcast refused by torch)
        for work in issued:
            while not work.is_completed():
                _raise_if_failed(http)
                await asyncio.sleep(_POLL_S)
            work.wait()  # the broadcast's own error (a timeout, a rank gone)

    async def aclose(self) -> None:
        """The servers leave the group (best effort: older servers lack the endpoint), then
        rank 0's side is destroyed."""
        group, self._group = self._group, None
        if group is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.client.destroy_weights_update_group(self.group_name), timeout=10
            )
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
        self._store = None


def _raise_if_failed(http: asyncio.Future[Any]) -> None:
    """The servers' HTTP call failed: its error, raised here (the broadcasts waiting for them
    would otherwise wait for the group's timeout)."""
    if http.done() and not http.cancelled() and http.exception() is not None:
        error = http.exception()
        assert error is not None
        raise error


def _issue(
    group: Any,
    device: Any,
    tensors: Sequence[tuple[str, Any]],
    issued: list[Any],
    timeout: float,
) -> None:
    """Broadcast each tensor from rank 0 (asynchronously; the works go to ``issued``), on
    ``device`` for NCCL, on CPU for gloo. Copies to another device (an FSDP2 state dict on
    CPU) are waited for every ``_BUCKET_BYTES``, so they never sit on the GPU whole; torch
    keeps a copy alive on the collective's stream until its broadcast is done."""
    import torch
    import torch.distributed as dist

    if device is not None and device.index is not None:
        torch.cuda.set_device(device)  # per thread
    copies: list[Any] = []  # works of copies not yet waited for
    copied = 0
    for _, tensor in tensors:
        t = tensor.detach()
        if device is not None and t.device != device:
            t = t.to(device)
        elif device is None and t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        work = dist.broadcast(t, group_src=0, group=group, async_op=True)
        issued.append(work)
        if t.data_ptr() != tensor.data_ptr():
            copies.append(work)
            copied += t.numel() * t.element_size()
        if copied > _BUCKET_BYTES:
            deadline = time.monotonic() + timeout
            for pending in copies:  # on the host: NCCL's wait() only orders streams
                while not pending.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"a broadcast was not received within {timeout} s")
                    time.sleep(_POLL_S)
            copies, copied = [], 0


def _join_group(store: Any, backend: str, world_size: int, name: str, timeout: float) -> Any:
    """Rank 0's side of the group. Gloo connects every pair of ranks here, so this returns
    once the servers have joined; NCCL connects at the first broadcast."""
    from torch.distributed import distributed_c10d as c10d

    wait = datetime.timedelta(seconds=timeout)
    group_name: Any = getattr(c10d, "GroupName", str)(name)
    group, _ = c10d._new_process_group_helper(
        world_size, 0, [], backend, store, group_name=group_name, timeout=wait
    )
    c10d._world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
    return group


def _in_daemon_thread(fn: Callable[[], T], *, name: str) -> asyncio.Future[T]:
    """``fn()`` on a daemon thread, as a future of this loop: a thread blocked in a group that
    never forms (its timeout) must not hold up the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def body() -> None:
        try:
            result = fn()
        except BaseException as e:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, False, e)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


def _policy_device(model: Any) -> Any:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def local_address_towards(url: str) -> str:
    """This machine's address on the interface that reaches the host of ``url``
    (``127.0.0.1`` for a loopback host): what a server there connects back to. Found with a
    UDP socket's ``connect``, which sends nothing."""
    host = urlsplit(url).hostname or "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        family, _, _, _, target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(target)
            return str(s.getsockname()[0])
    except OSError as e:
        raise WeightSyncError(
            f"cannot tell which address of this machine the SGLang server {url} reaches "
            f"({e}): set engine.sync_address"
        ) from e


def _reason(error: BaseException) -> str:
    if isinstance(error, ServerControlError | ServerUnavailableError):
        return str(error)
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."
