"""The SGLang client's weight-sync calls, and the trainer's weight sync over SGLang servers.

:class:`WeightSyncCalls` (a part of :class:`~treegrpo.engine.sglang_client.SGLangClient`):

- from disk: ``/update_weights_from_disk`` inside ``/pause_generation`` and
  ``/continue_generation`` (servers without ``/pause_generation`` get ``abort_all_requests``);
- over a process group: ``/init_weights_update_group`` and ``/update_weights_from_distributed``
  (the HTTP side; the trainer broadcasts the tensors);
- stale weights: a server that restarted answers from its base weights; the last update from
  disk is pushed to it again (:meth:`WeightSyncCalls._restore_weights`), or
  :class:`~treegrpo.engine.errors.StaleWeightsError` is raised where it cannot be.

:class:`SGLangWeightSync` is the client's :class:`~treegrpo.engine.base.WeightSync` for the
trainer with ``weight_sync="disk"``: after each update rank 0 saves the policy to a directory
and pushes it from disk (``"distributed"``: :mod:`treegrpo.engine.sglang_group`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from treegrpo.engine.base import PolicySource
from treegrpo.engine.errors import ServerRequestError, StaleWeightsError
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError

if TYPE_CHECKING:
    from treegrpo.engine.sglang_client import SGLangClient, _Server

__all__ = ["SGLangWeightSync", "WeightSyncCalls"]

logger = logging.getLogger("treegrpo.engine.sglang_client")

PAUSE_MODES = ("abort", "retract", "in_place")
# Re-pushes of the weights one request may trigger before its server counts as broken.
MAX_REPUSHES = 3


class WeightSyncCalls:
    """The weight-update and pause calls of :class:`SGLangClient` (see the module docstring)."""

    # The client's state these calls use (set by SGLangClient.__init__).
    routing: str
    weight_repushes: int
    _control: list[str]
    _servers: list[_Server]
    _pushed: tuple[str, dict[str, Any]] | None
    _version_epoch: int
    _weight_version: str

    if TYPE_CHECKING:

        async def _ensure_started(self) -> None: ...

        async def _control_post(self, url: str, path: str, body: dict[str, Any]) -> Any: ...

    async def update_weights_from_disk(
        self,
        model_path: str,
        weight_version: str,
        *,
        load_format: str | None = None,
        flush_cache: bool = True,
        pause_mode: Literal["abort", "retract", "in_place"] | None = "abort",
    ) -> None:
        """Load an HF checkpoint that every server can read from ``model_path``; afterwards
        answers report ``weight_version``.

        The update runs between ``POST /pause_generation {"mode": pause_mode}`` and
        ``POST /continue_generation`` (``"abort"``: requests in flight come back with
        ``finish.type == "abort"``; ``"retract"``/``"in_place"``: they resume on the new
        weights). ``pause_mode=None``, or a server without ``/pause_generation``, sends
        ``abort_all_requests: true`` with the update instead. ``flush_cache`` empties the radix
        caches (SGLang's default): the next round starts cold.

        Raises:
            ServerControlError: a server answered ``success: false`` (e.g. a bad path).
        """
        body: dict[str, Any] = {
            "model_path": str(model_path),
            "weight_version": str(weight_version),
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            body["load_format"] = load_format
        await self._update_weights("/update_weights_from_disk", body, pause_mode)
        self._after_weight_update(str(weight_version), flush_cache)
        self._pushed = ("/update_weights_from_disk", body)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int | Sequence[int],
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Ask the servers to join the trainer's process group for weight broadcasts.

        The trainer is rank 0 (the group's master at ``master_address:master_port``); a server
        with G GPUs takes ranks ``rank_offset .. rank_offset + G - 1``. With several control
        URLs pass one ``rank_offset`` per URL. The call returns once every rank has joined, so
        the trainer must join the group concurrently, e.g. in a thread::

            join = asyncio.to_thread(init_trainer_group, ...)  # the trainer side
            await asyncio.gather(join, client.init_weights_update_group(addr, port, 1, 2))
        """
        offsets = [rank_offset] if isinstance(rank_offset, int) else list(rank_offset)
        if len(offsets) != len(self._control):
            raise InvalidArgumentError(
                f"rank_offset gives {len(offsets)} offsets for {len(self._control)} servers: "
                "pass one per server (e.g. [1, 1 + G, 1 + 2G] for servers of G GPUs)"
            )
        await self._ensure_started()
        await asyncio.gather(
            *(
                self._control_post(
                    url,
                    "/init_weights_update_group",
                    {
                        "master_address": master_address,
                        "master_port": int(master_port),
                        "rank_offset": int(offset),
                        "world_size": int(world_size),
                        "group_name": group_name,
                        "backend": backend,
                    },
                )
                for url, offset in zip(self._control, offsets, strict=True)
            )
        )

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """``POST /destroy_weights_update_group {"group_name"}`` on every control URL: the
        servers leave the group (SGLang >= 0.5; older servers answer 404)."""
        await self._ensure_started()
        await asyncio.gather(
            *(
                self._control_post(url, "/destroy_weights_update_group", {"group_name": group_name})
                for url in self._control
            )
        )

    async def update_weights_from_distributed(
        self,
        named_tensors_meta: Iterable[tuple[str, Any, Sequence[int]]],
        group_name: str,
        weight_version: str,
        *,
        flush_cache: bool = True,
        pause_mode: Literal["abort", "retract", "in_place"] | None = "abort",
    ) -> None:
        """Receive new weights over the group of :meth:`init_weights_update_group`.

        ``named_tensors_meta``: ``(name, dtype, shape)`` per tensor, in the order the trainer
        broadcasts them from its rank 0 (dtype as ``torch.bfloat16`` or ``"bfloat16"``). This
        sends the HTTP side only and returns when the servers have received every tensor, so
        the trainer must broadcast concurrently (in a thread: the broadcasts block)::

            send = asyncio.to_thread(broadcast_all, model, group)  # the trainer side
            await asyncio.gather(send, client.update_weights_from_distributed(meta, "g", "v2"))
        """
        names, dtypes, shapes = [], [], []
        for name, dtype, shape in named_tensors_meta:
            names.append(str(name))
            dtypes.append(str(dtype).removeprefix("torch."))
            shapes.append([int(d) for d in shape])
        body = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "flush_cache": flush_cache,
            "weight_version": str(weight_version),
        }
        await self._update_weights("/update_weights_from_distributed", body, pause_mode)
        self._after_weight_update(str(weight_version), flush_cache)
        self._pushed = ("/update_weights_from_distributed", body)

    async def _update_weights(
        self,
        path: str,
        body: dict[str, Any],
        pause_mode: str | None,
        *,
        urls: Sequence[str] | None = None,
    ) -> None:
        """``path`` with ``body`` on ``urls`` (default: every control URL), inside a pause."""
        if pause_mode is not None and pause_mode not in PAUSE_MODES:
            raise InvalidOptionError(
                f"pause_mode must be one of {PAUSE_MODES} or None, got {pause_mode!r}"
            )
        await self._ensure_started()
        targets = list(self._control if urls is None else urls)
        paused: list[str] = []
        try:
            if pause_mode is not None:
                for url in targets:
                    try:
                        await self._control_post(url, "/pause_generation", {"mode": pause_mode})
                        paused.append(url)
                    except ServerRequestError as e:
                        if e.status != 404:
                            raise
            bodies = [
                dict(body, abort_all_requests=url not in paused)
                if path == "/update_weights_from_disk"
                else body
                for url in targets
            ]
            await asyncio.gather(
                *(self._control_post(url, path, b) for url, b in zip(targets, bodies, strict=True))
            )
        finally:
            for url in paused:
                await self._control_post(url, "/continue_generation", {})

    def _after_weight_update(self, weight_version: str, flush_cache: bool) -> None:
        self._weight_version = weight_version
        self._version_epoch += 1
        if flush_cache:
            for server in self._servers:
                server.cache.reset()

    async def pause_generation(
        self, mode: Literal["abort", "retract", "in_place"] = "abort"
    ) -> None:
        """``POST /pause_generation`` on every control URL (``"abort"``: requests in flight come
        back aborted; ``"retract"``/``"in_place"``: they wait for :meth:`continue_generation`)."""
        if mode not in PAUSE_MODES:
            raise InvalidOptionError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        await self._ensure_started()
        await asyncio.gather(
            *(self._control_post(u, "/pause_generation", {"mode": mode}) for u in self._control)
        )

    async def continue_generation(self) -> None:
        """``POST /continue_generation`` on every control URL."""
        await self._ensure_started()
        await asyncio.gather(
            *(self._control_post(u, "/continue_generation", {}) for u in self._control)
        )

    async def _restore_weights(self, server: _Server, got: str, seen: int, repushes: int) -> None:
        """Push the last weight update again to ``server``, which answered from weights of
        version ``got`` (a restart with its base weights), unless another request did so after
        ``seen``. Raises :class:`StaleWeightsError` where that cannot be done."""
        assert self._pushed is not None
        path, body = self._pushed
        expected = body["weight_version"]
        async with server.repush_lock:
            if server.repushes != seen:
                return  # restored since this request was sent: generate it again
            where = f"SGLang server {server.url} answered from weight_version {got!r}"
            if path != "/update_weights_from_disk":
                raise StaleWeightsError(
                    f"{where}, not {expected!r} (the version last pushed): it restarted with "
                    f"other weights, and the client cannot push weights sent over {path} again. "
                    "Restart the run (it resumes from its last checkpoint)",
                    url=server.url,
                    expected=expected,
                    got=got,
                )
            if repushes > MAX_REPUSHES:
                raise StaleWeightsError(
                    f"{where} after {MAX_REPUSHES} pushes of {expected!r} from "
                    f"{body['model_path']}: the update does not take; check the server's log",
                    url=server.url,
                    expected=expected,
                    got=got,
                )
            logger.warning(
                "%s, not %r (the version last pushed): it restarted with other weights. "
                "Pushing %s again; its answers from the other weights are discarded and "
                "generated again.",
                where,
                expected,
                body["model_path"],
            )
            urls = [server.url] if self.routing != "router" else self._control
            await self._update_weights(path, body, "abort", urls=urls)
            if body.get("flush_cache", True):
                for each in self._servers if self.routing == "router" else [server]:
                    each.cache.reset()
            server.repushes += 1
            self.weight_repushes += 1


class SGLangWeightSync:
    """:class:`~treegrpo.engine.base.WeightSync` over SGLang servers: they hold their own copy
    of the weights, so every :meth:`push` sends the policy (rank 0 saves it to
    ``source.directory`` and has every server load it; the other ranks wait at the barrier).
    The servers keep no sampling state for a checkpoint (they sample unseeded)."""

    on_step = None
    hold = None
    keeps_state = False

    def __init__(self, client: SGLangClient, source: PolicySource) -> None:
        self.client = client
        self.source = source

    def start(self) -> None:
        """Nothing to form: every push goes through ``source.directory``."""

    def push(self, version: int) -> None:
        source = self.source
        state = source.state_dict(False) if source.sharded else None  # a collective (FSDP2)
        if source.is_main:  # replicas are identical: rank 0 pushes to every server
            directory = source.directory
            source.model.save_pretrained(directory, safe_serialization=True, state_dict=state)
            source.tokenizer.save_pretrained(directory)
            source.run(
                self.client.update_weights_from_disk(str(directory), weight_version=str(version))
            )
        source.barrier()  # no rank rolls out before the servers hold the new weights

    def weights_loaded(self) -> None:
        """Nothing: the next :meth:`push` sends the loaded weights."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore (see the class docstring)."""
