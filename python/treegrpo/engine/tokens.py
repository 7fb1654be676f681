"""The one token-id check, for every engine and the SGLang stand-in.

SGLang does not check token ids (an id beyond the vocabulary may crash the server), so the
client checks them before sending, the embedded engine before indexing its embedding, and the
stand-in as a real server would fail on them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from treegrpo.engine.errors import InvalidTokenError

__all__ = ["check_token_ids"]


def check_token_ids(
    ids: Iterable[Any],
    vocab_size: int | None,
    *,
    where: str,
    name: str = "input_ids",
    note: str = "",
) -> list[int]:
    """``ids`` as a list of ints, each in ``[0, vocab_size)`` (only ``>= 0`` when
    ``vocab_size`` is None). Ints and NumPy / torch integers pass; bools, floats and strings do
    not, nor a string or a tensor-less scalar in place of the sequence.

    Raises:
        InvalidTokenError: naming ``where`` (e.g. ``"request 3"``), ``name`` and the position;
            ``out_of_range`` tells an id outside the vocabulary from one that is not an int.
            ``note`` is added to the out-of-range message.
    """
    if hasattr(ids, "tolist"):  # a tensor or an array
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise InvalidTokenError(f"{where}: {name} must be token ids, not a string")
    out: list[int] = []
    for pos, raw in enumerate(ids):
        try:
            if isinstance(raw, bool):
                raise TypeError
            token = operator.index(raw)
        except TypeError:
            raise InvalidTokenError(
                f"{where}: {name}[{pos}] is {raw!r}, not an int token id"
            ) from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InvalidTokenError(
                f"{where}: {name}[{pos}] = {token} is outside the vocabulary {bound}{note}",
                out_of_range=True,
            )
        out.append(token)
    return out
