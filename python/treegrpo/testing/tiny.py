"""A tiny random policy for tests: a Llama with random weights and a small BPE tokenizer, built in
process in well under a second (nothing is downloaded).

- :func:`tiny_tokenizer`: a byte-level BPE tokenizer trained in memory on a fixed text about
  search agents (``<search>``, ``</answer>``... are a few tokens each), wrapped in
  ``PreTrainedTokenizerFast`` with a ChatML chat template. Special tokens: ``<|endoftext|>`` (0,
  padding), ``<|im_start|>`` (1), ``<|im_end|>`` (2, end of sequence). Training is deterministic,
  so every call builds the same vocabulary.
- :func:`tiny_model`: a ``LlamaForCausalLM`` with random weights drawn from ``seed`` (the global
  torch RNG is left untouched), grouped-query attention, rotary positions; float32, eval mode.
- :func:`tiny_policy`: both, vocabularies matched: ``(model, tokenizer)``.

The model's outputs are gibberish, but deterministic and sensitive to every token and position,
which is what engine and learner tests need.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["SPECIAL_TOKENS", "tiny_model", "tiny_policy", "tiny_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""The tiny tokenizer's special tokens, ids 0, 1, 2."""

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. If you find no further "
    "external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>.",
    "Question: in which country is the city where the founder of the company was born?",
    "<think> I need to find the founder first. </think> <search> founder of the company </search>",
    '<information>Doc 1(Title: "The company") The company was founded in 1921 by a painter '
    "who was born in a small city on the northern coast.</information>",
    "<think> Now I know the city. </think> <answer> the northern kingdom </answer>",
    "the quick brown fox jumps over the lazy dog, 0123456789 times, and then it rests.",
)


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A small byte-level BPE ``PreTrainedTokenizerFast`` (see the module docstring).

    ``vocab_size`` must be at least 259 (256 bytes + 3 special tokens); merges fill the rest,
    up to what the training text allows."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_model(
    vocab_size: int = 320,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    attn_implementation: str = "sdpa",
) -> Any:
    """A ``LlamaForCausalLM`` with random weights from ``seed`` (float32, eval mode).

    ``vocab_size`` must cover the tokenizer's ids (:func:`tiny_tokenizer`'s length by default).
    Token ids 0/1/2 are pad/BOS/EOS, as in :func:`tiny_tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.eval()
    return model


def tiny_policy(seed: int = 0, **model_options: Any) -> tuple[Any, Any]:
    """``(tiny_model(len(tokenizer), seed=seed, **model_options), tiny_tokenizer())``."""
    tokenizer = tiny_tokenizer()
    return tiny_model(len(tokenizer), seed=seed, **model_options), tokenizer
