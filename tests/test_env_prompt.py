"""The Search-R1 prompt: the template verbatim, question normalisation, rendering to token ids."""

from __future__ import annotations

import numpy as np
import pytest
from fake_tokenizer import ChunkTokenizer
from treegrpo.env.prompt import (
    SEARCH_R1_TEMPLATE,
    PromptBuilder,
    has_chat_template,
    normalize_question,
)

# Copied by hand from ../shared/docs/search-agent.md (one line, then the newline).
DOC_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can "
    "call a search engine by <search> query </search> and it will return the top searched results "
    "between <information> and </information>. You can search as many times as your want. If you "
    "find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, <answer> Beijing "
    "</answer>. Question: {question}\n"
)


def test_template_is_search_r1_base_verbatim() -> None:
    assert SEARCH_R1_TEMPLATE == DOC_TEMPLATE
    assert "as your want" in SEARCH_R1_TEMPLATE
    assert SEARCH_R1_TEMPLATE.count("\n") == 1 and SEARCH_R1_TEMPLATE.endswith("{question}\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("who wrote hamlet", "who wrote hamlet?"),
        ("  who wrote hamlet?  ", "who wrote hamlet?"),
        ("\twhere is it\n", "where is it?"),
        ("is it?!", "is it?!?"),  # Search-R1 only looks at the last character
        ("What?", "What?"),
    ],
)
def test_normalize_question(raw: str, expected: str) -> None:
    assert normalize_question(raw) == expected


def test_normalize_question_rejects_empty_and_non_str() -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_question("   ")
    with pytest.raises(TypeError, match="str"):
        normalize_question(None)  # type: ignore[arg-type]


def test_text_fills_the_template() -> None:
    text = PromptBuilder().text(" who wrote hamlet ")
    assert text == DOC_TEMPLATE.replace("{question}", "who wrote hamlet?")


def test_custom_templates() -> None:
    assert PromptBuilder("Q: {question} {json: 1}").text("x") == "Q: x? {json: 1}"
    assert PromptBuilder(lambda q: f"<<{q}>>").text("x") == "<<x?>>"
    with pytest.raises(ValueError, match=r"\{question\} placeholder"):
        PromptBuilder("no placeholder")
    with pytest.raises(TypeError, match="str or a function"):
        PromptBuilder(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a str"):
        PromptBuilder(lambda q: 3).text("x")  # type: ignore[arg-type, return-value]


def test_render_applies_the_chat_template_with_the_generation_prompt() -> None:
    tok = ChunkTokenizer()
    builder = PromptBuilder()
    ids = builder.render("who wrote hamlet", tok)
    expected = f"<|user|>\n{builder.text('who wrote hamlet')}<|end|>\n<|assistant|>\n"
    assert tok.decode(ids) == expected
    assert ids[0] != tok.BOS  # no special tokens added on top of the chat template
    assert builder.render_text(builder.messages("who wrote hamlet"), tok) == expected


def test_render_without_chat_template_encodes_the_raw_text() -> None:
    tok = ChunkTokenizer(chat=False)
    assert not has_chat_template(tok)
    builder = PromptBuilder()
    assert tok.decode(builder.render("q", tok)) == builder.text("q")
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(use_chat_template=True).render("q", tok)
    chat_tok = ChunkTokenizer()
    raw = PromptBuilder(use_chat_template=False).render("q", chat_tok)
    assert chat_tok.decode(raw) == builder.text("q")


def test_render_messages_from_a_parquet_row() -> None:
    tok = ChunkTokenizer()
    content = PromptBuilder().text("who wrote hamlet")
    # pandas / NumPy hand the prompt column over as an object array of dicts.
    messages = np.array([{"role": "user", "content": content}], dtype=object)
    ids = PromptBuilder().render_messages(messages, tok)
    assert ids == PromptBuilder().render("who wrote hamlet", tok)


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ("just text", TypeError, "list of"),
        ({"role": "user", "content": "x"}, TypeError, "list of"),
        ([{"role": "user"}], TypeError, "message 0"),
        ([{"role": "user", "content": None}], TypeError, "must be str"),
        ([], ValueError, "empty"),
    ],
)
def test_render_messages_rejects_bad_messages(messages: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PromptBuilder().render_messages(messages, ChunkTokenizer())  # type: ignore[arg-type]


def test_real_hf_tokenizer() -> None:
    """A real PreTrainedTokenizerFast, trained in memory (no download), through the same paths."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (optional extra 'dense')"
    )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from treegrpo.env.steps import SearchEnv, StepInput
    from treegrpo.env.types import Document

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    core.train_from_iterator([SEARCH_R1_TEMPLATE] * 4, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    builder = PromptBuilder()
    ids = builder.render("who wrote hamlet", tok)
    via_hf = tok.apply_chat_template(
        builder.messages("who wrote hamlet"), add_generation_prompt=True, tokenize=False
    )
    assert ids == tok.encode(via_hf, add_special_tokens=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")

    class Docs:
        def retrieve(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
            return [[Document("1", '"Hamlet"\n' + "Hamlet is a tragedy. " * 200)] for _ in queries]

    env = SearchEnv(tok, retriever=Docs(), max_obs_tokens=120)
    import asyncio

    (r,) = asyncio.run(env.step([StepInput("<search> hamlet </search>", 0)]))
    assert len(r.observation_ids) <= 120
    assert r.observation_text.startswith('\n\n<information>Doc 1(Title: "Hamlet") Hamlet')
    assert r.observation_text.endswith("</information>\n\n")
    assert list(r.observation_ids) == tok.encode(r.observation_text, add_special_tokens=False)
