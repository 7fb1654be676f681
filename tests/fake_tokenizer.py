"""Small in-process tokenizers with the Hugging Face surface the environment uses (tests must not
download one).

- :class:`ChunkTokenizer`: one token per ``chunk`` characters, ids handed out on first sight, so
  ``decode(encode(text)) == text`` and token counts are easy to reason about.
- :class:`MergingTokenizer`: like ``chunk=1``, but a ``>`` followed by a letter costs one extra
  (empty) token, so a text's token count depends on its neighbours, as with BPE merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ChunkTokenizer:
    """``chunk`` characters per token; a trivial chat template when ``chat`` is True."""

    BOS = 0

    def __init__(self, chunk: int = 1, *, chat: bool = True) -> None:
        self.chunk = chunk
        self.chat_template: str | None = "<|role|>\\ncontent<|end|>" if chat else None
        self.pieces: list[str] = ["<s>"]
        self.ids: dict[str, int] = {"<s>": self.BOS}

    def _id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS] if add_special_tokens else []
        ids += [self._id(text[i : i + self.chunk]) for i in range(0, len(text), self.chunk)]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == self.BOS))

    def apply_chat_template(
        self,
        conversation: Any,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> Any:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in conversation)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text, add_special_tokens=False) if tokenize else text


class MergingTokenizer(ChunkTokenizer):
    """One token per character, plus an empty token after each ``>`` that precedes a letter."""

    def __init__(self) -> None:
        super().__init__(chunk=1)
        self.EXTRA = self._id("")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS] if add_special_tokens else []
        for i, ch in enumerate(text):
            ids.append(self._id(ch))
            if ch == ">" and i + 1 < len(text) and text[i + 1].isalpha():
                ids.append(self.EXTRA)
        return ids
