"""The control endpoints of the two SGLang test doubles, written once.

The stand-in (:mod:`treegrpo.testing.sglang_standin`) and the simulator
(:mod:`treegrpo.testing.sglang_sim`) each keep a queue of ``/generate`` jobs, waiting and
running, and answer SGLang's control endpoints over it the same way (sglang.md):

- ``POST /abort_request``: every unfinished sample whose id starts with ``rid`` (or every one
  with ``abort_all``) finishes with ``{"type": "abort", "message": ...}``; jobs left with no
  running sample answer at once (HTTP 200 and their partial output); a ``rid`` that is not a
  string is an HTTP 400 ``{"error": {"message": ...}}``. The answer is an empty HTTP 200.
- ``POST /pause_generation``: new decode steps wait; mode ``abort`` (the default) also aborts
  everything, ``retract`` and ``in_place`` hold it; another mode is a failed control answer.
- ``POST /continue_generation``: the queue runs again.
- ``POST /flush_cache``: refused (HTTP 400) unless no job waits or runs.

:class:`ControlEndpoints` is that part, a base class; a double gives it its job type (jobs with
``samples``, each with ``id`` and ``finish``), what closing a finished job does
(:meth:`~ControlEndpoints._release`), how its cache is emptied
(:meth:`~ControlEndpoints._clear_cache`) and its own wording (:class:`ControlMessages`).
Like the protocol module, it imports nothing from ``treegrpo.engine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

from treegrpo.testing import sglang_protocol as protocol

__all__ = ["ControlEndpoints", "ControlMessages"]


@dataclass(frozen=True)
class ControlMessages:
    """A double's wording of its control answers and of the aborts they cause.

    - ``abort_all``, ``abort_rid``: a sample's abort message from ``/abort_request`` with
      ``abort_all``, and by rid prefix.
    - ``pause_abort``: a sample's abort message from ``/pause_generation`` in mode ``abort``.
    - ``paused``: the answer to ``/pause_generation``, ``{mode}`` filled in.
    - ``continued``: the answer to ``/continue_generation``.
    - ``flush_busy``: the refusal of ``/flush_cache`` while a job waits or runs.
    """

    abort_all: str
    abort_rid: str
    pause_abort: str
    paused: str
    continued: str
    flush_busy: str


class ControlEndpoints:
    """The queue state the control endpoints act on, and the endpoints.

    A subclass sets :attr:`control_messages` and, in its ``__init__``, ``_waiting`` and
    ``_running`` (lists of jobs), ``_paused`` (False) and ``_wake`` (None until its scheduler
    starts: the event that wakes it); it defines :meth:`_release` and :meth:`_clear_cache`.
    """

    control_messages: ClassVar[ControlMessages]

    _waiting: list[Any]
    _running: list[Any]
    _paused: bool
    _wake: asyncio.Event | None

    # ------------------------------------------------------------------ the double's part

    def _release(self, job: Any) -> None:
        """A job all of whose samples have finished leaves the queue: answer it (and whatever
        else the double does then)."""
        raise NotImplementedError

    async def _clear_cache(self) -> None:
        """Empty the double's prefix cache (only called while idle)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the queue

    def _poke(self) -> None:
        """Wake the scheduler (if it runs yet)."""
        if self._wake is not None:
            self._wake.set()

    def _busy(self) -> bool:
        """A job waits or runs."""
        return bool(self._waiting or self._running)

    def _complete_finished(self) -> None:
        """Release every running job whose samples have all finished."""
        for job in list(self._running):
            if all(s.finish is not None for s in job.samples):
                self._running.remove(job)
                self._release(job)

    def _abort_matching(self, match: Callable[[Any], bool], message: str) -> int:
        """Abort every unfinished sample, waiting or running, that ``match`` picks, with
        ``message``; release the jobs that leaves finished. Returns how many it aborted."""
        count = 0
        for job in self._waiting + self._running:
            for s in job.samples:
                if s.finish is None and match(s):
                    s.finish = {"type": "abort", "message": message}
                    count += 1
        for job in list(self._waiting):
            if all(s.finish is not None for s in job.samples):
                self._waiting.remove(job)
                self._release(job)
        self._complete_finished()
        self._poke()
        return count

    # ------------------------------------------------------------------ endpoints

    async def _abort_request(self, request: web.Request) -> web.Response:
        try:
            abort_all, rid = protocol.parse_abort(await protocol.json_body(request))
        except protocol.BadRequest as e:
            return protocol.error(400, str(e))
        words = self.control_messages
        if abort_all:
            self._abort_matching(lambda s: True, words.abort_all)
        elif rid:
            self._abort_matching(lambda s: s.id.startswith(rid), words.abort_rid)
        return web.Response(status=200)

    async def _pause_generation(self, request: web.Request) -> web.Response:
        try:
            mode = protocol.pause_mode(await protocol.json_body(request))
        except protocol.BadRequest as e:
            return protocol.control(False, str(e))
        self._paused = True
        if mode == "abort":
            self._abort_matching(lambda s: True, self.control_messages.pause_abort)
        return protocol.control(True, self.control_messages.paused.format(mode=mode))

    async def _continue_generation(self, request: web.Request) -> web.Response:
        self._paused = False
        self._poke()
        return protocol.control(True, self.control_messages.continued)

    async def _flush_cache(self, request: web.Request) -> web.Response:
        if self._busy():
            return protocol.control(False, self.control_messages.flush_busy)
        await self._clear_cache()
        return protocol.control(True, "Cache flushed.")
