"""The prompt: Search-R1's "base" template and its rendering into prompt token ids.

The template is the user message. When the tokenizer has a chat template it is applied with the
generation prompt (as Search-R1 does for every model whose tokenizer has one, base models
included); otherwise the raw text is encoded. Rendering goes through text
(``apply_chat_template(..., tokenize=False)`` then ``encode(text, add_special_tokens=False)``),
which gives the same ids as ``tokenize=True`` and does not depend on what a given transformers
version returns for ``tokenize=True`` (a list, or a ``BatchEncoding``).

The tokenizer is duck-typed (:class:`TokenizerLike`): any Hugging Face tokenizer works, and so
does a small stand-in with the same four members.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "SEARCH_R1_TEMPLATE",
    "PromptBuilder",
    "TokenizerLike",
    "has_chat_template",
    "normalize_question",
]

# Search-R1's "base" template, verbatim (one line, "as your want" included, a newline at the end).
SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)

_PLACEHOLDER = "{question}"

Messages = list[dict[str, str]]


@runtime_checkable
class TokenizerLike(Protocol):
    """What the environment needs from a tokenizer (a Hugging Face tokenizer has all of it).

    ``chat_template`` is ``None`` (or empty) when the model has none; ``apply_chat_template`` is
    only called when it is set."""

    chat_template: Any

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(
        self, conversation: Any, add_generation_prompt: bool = ..., tokenize: bool = ...
    ) -> Any: ...


def has_chat_template(tokenizer: object) -> bool:
    """Whether ``tokenizer`` has a chat template to apply."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )


def normalize_question(question: str) -> str:
    """Strip the question and end it with "?" if it does not already (as Search-R1 does)."""
    if not isinstance(question, str):
        raise TypeError(f"a question must be a str, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise ValueError("the question is empty (after stripping whitespace)")
    return q if q.endswith("?") else q + "?"


class PromptBuilder:
    """Builds the user message of a question and renders it into prompt token ids.

    ``template`` is a string with one ``{question}`` placeholder (only that placeholder is
    replaced; other braces are left as they are) or a function from the normalised question to
    the user message. The default is Search-R1's base template, the one users' numbers were
    produced with.

    ``use_chat_template``: ``None`` (default) applies the tokenizer's chat template when it has
    one; ``True`` requires one; ``False`` always encodes the raw text."""

    def __init__(
        self,
        template: str | Callable[[str], str] = SEARCH_R1_TEMPLATE,
        *,
        use_chat_template: bool | None = None,
    ) -> None:
        if isinstance(template, str):
            if _PLACEHOLDER not in template:
                raise ValueError(
                    "the prompt template has no {question} placeholder; put '{question}' where "
                    "the question goes, or pass a function question -> text"
                )
        elif not callable(template):
            raise TypeError(
                f"template must be a str or a function question -> text, got "
                f"{type(template).__name__}"
            )
        self.template = template
        self.use_chat_template = use_chat_template

    def __repr__(self) -> str:
        name = "SEARCH_R1_TEMPLATE" if self.template == SEARCH_R1_TEMPLATE else "custom"
        return f"PromptBuilder(template={name}, use_chat_template={self.use_chat_template})"

    def text(self, question: str) -> str:
        """The user message for ``question`` (normalised first)."""
        q = normalize_question(question)
        if isinstance(self.template, str):
            return self.template.replace(_PLACEHOLDER, q)
        text = self.template(q)
        if not isinstance(text, str):
            raise TypeError(f"the template function returned {type(text).__name__}, not a str")
        return text

    def messages(self, question: str) -> Messages:
        """The chat messages for ``question``: one user message."""
        return [{"role": "user", "content": self.text(question)}]

    def render(self, question: str, tokenizer: TokenizerLike) -> list[int]:
        """Prompt token ids for ``question``."""
        return self.render_messages(self.messages(question), tokenizer)

    def render_text(self, messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike) -> str:
        """The prompt as text: the chat template with the generation prompt, or, without a chat
        template, the messages' contents joined (one message gives exactly its content)."""
        msgs = _check_messages(messages)
        if self._chat(tokenizer):
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if not isinstance(text, str):
                raise TypeError(
                    "tokenizer.apply_chat_template(..., tokenize=False) returned "
                    f"{type(text).__name__}, expected the rendered str"
                )
            return text
        return "\n".join(m["content"] for m in msgs)

    def render_messages(
        self, messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike
    ) -> list[int]:
        """Prompt token ids for chat messages that already hold the rendered user message (the
        ``prompt`` column of a Search-R1 Parquet row)."""
        return list(
            tokenizer.encode(self.render_text(messages, tokenizer), add_special_tokens=False)
        )

    def _chat(self, tokenizer: object) -> bool:
        has = has_chat_template(tokenizer)
        if self.use_chat_template is None:
            return has
        if self.use_chat_template and not has:
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat template; set "
                "tokenizer.chat_template or use use_chat_template=None to encode the raw text"
            )
        return self.use_chat_template


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> Messages:
    """Plain ``{"role", "content"}`` dicts, whatever sequence type held them (e.g. a NumPy
    object array read from Parquet)."""
    if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}"
        )
    out: Messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(
                f"message {i} must be a mapping with 'role' and 'content', got {m!r:.80}"
            )
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"message {i}: 'role' and 'content' must be str")
        out.append({"role": role, "content": content})
    if not out:
        raise ValueError("messages is empty; a prompt needs at least one message")
    return out
