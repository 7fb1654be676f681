"""The errors the generation engines raise.

Each derives from :class:`treegrpo.exceptions.TreeGRPOError` (through :class:`EngineError`) and
from the built-in it refines, so ``except ConnectionError`` / ``except ValueError`` keep working.
"""

from __future__ import annotations

from treegrpo.exceptions import InvalidArgumentError, TreeGRPOError

__all__ = [
    "EngineClosedError",
    "EngineError",
    "InvalidTokenError",
    "ServerControlError",
    "ServerRequestError",
    "ServerResponseError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "StaleWeightsError",
    "WeightSyncError",
]


class EngineError(TreeGRPOError):
    """Base class of the errors of a generation engine or of a generation server."""


class InvalidTokenError(EngineError, InvalidArgumentError):
    """A token id that is negative, not an int, or beyond the model's vocabulary. Caught before
    anything is sent: SGLang does not check token ids and may crash on one. The message names
    the request and the position; ``out_of_range`` is True for an int outside the vocabulary
    (False: not an int at all)."""

    def __init__(self, message: str, *, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


class EngineClosedError(EngineError, RuntimeError):
    """A call on an engine (or client) after :meth:`close`."""


class ServerUnavailableError(EngineError, ConnectionError):
    """A generation server that could not be reached (refused or dropped connection, HTTP 5xx),
    after every retry. The message names the URL and the last error."""


class ServerTimeoutError(ServerUnavailableError, TimeoutError):
    """A generation server that did not answer within the timeout, after every retry."""


class ServerRequestError(EngineError, ValueError):
    """A request the server rejected (HTTP 4xx: a bad value, a prompt longer than the context, a
    duplicate request id). Never retried. ``status`` is the HTTP status, ``url`` the endpoint,
    ``server_message`` the server's own words."""

    def __init__(self, message: str, *, status: int, url: str, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.server_message = server_message


class ServerResponseError(EngineError, ValueError):
    """A server answer that does not follow the protocol (not JSON, missing fields, the wrong
    number of samples). ``url`` is the endpoint."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ServerControlError(EngineError, RuntimeError):
    """A control endpoint (weight update, pause, flush, process group) that answered
    ``{"success": false, "message": ...}``. ``url`` is the endpoint, ``server_message`` the
    server's reason."""

    def __init__(self, message: str, *, url: str, server_message: str) -> None:
        super().__init__(message)
        self.url = url
        self.server_message = server_message


class StaleWeightsError(EngineError, RuntimeError):
    """A server that keeps answering from weights other than the ones last pushed to it (it
    restarted with its base weights) and that the client could not push them to again: the
    completions are not returned, since training on them would train on the wrong policy.
    ``url`` is the server, ``expected`` the version last pushed, ``got`` the one it reports."""

    def __init__(self, message: str, *, url: str, expected: str, got: str) -> None:
        super().__init__(message)
        self.url = url
        self.expected = expected
        self.got = got


class WeightSyncError(EngineError, RuntimeError):
    """A weight sync over a process group (``engine.weight_sync=distributed``) that could not
    be set up or did not complete: the group's port in use, a server that refused to join or
    to receive, ranks that never arrived, a broadcast that failed. The message says what to
    check."""
