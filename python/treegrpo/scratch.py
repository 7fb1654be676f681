"""A from-scratch policy for the synthetic world: a word-level tokenizer and a small Llama.

SmolLM2-135M takes ~100 s per training step on 2 CPU cores, too slow to show learning in a
quickstart. This builds a policy that trains in seconds per step and still uses the same
environment, step rules, rollout, learner and trainer as the pretrained path:

1. Tokenizer: a ``tokenizers`` WordLevel model over every word of the world (corpus, questions,
   gold episodes, the prompt template and the invalid-action message), so an invented name is
   one token. Measured on the 1,000 gold episodes (7 minutes of warm start on 2 cores): a BPE
   vocabulary of 8k with a 5.5M-parameter model reached 0% exact held-out actions, this word-
   level one with 1.3M parameters 20% (the default shape here, over the default world's ~5.5k
   words, has ~1.5M). The step tags (``<search>``, ``</answer>``...) are added tokens (not
   special: decoding never drops them), newlines are tokens of their own and spaces are kept on
   the word that follows them, so ``decode(encode(text)) == text`` for every text made of the
   world's words; anything else maps to ``[UNK]``.
2. Model: a ``LlamaForCausalLM`` of a few million parameters (:class:`ScratchConfig`) with
   random weights drawn from the seed, no chat template (the prompt is the short template
   :data:`SHORT_TEMPLATE`).
3. Warm start: the usual ``treegrpo sft`` on gold episodes of the world's train questions (loss
   on action tokens only). The tiny preset leaves room for RL with noise: 70% of its warm-start
   episodes answer at once without searching (``model.sft_guess``), so the warm-started policy
   mostly guesses (greedy held-out EM 0) and RL has to learn that searching pays; measured
   without the guesses, a warm start that always searches gains only +0.005 to +0.03 from RL
   (docs/benchmarks.md, "Quickstart" and "What the tiny policy learns").

The built checkpoint is cached under ``<cache root>/models/scratch-<key>``, the key hashing the
world's files and :class:`ScratchConfig`, so a change of either builds a new one; the directory
is written to a temporary name and renamed into place, so an interrupted build leaves nothing
that a later run could mistake for a policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treegrpo.engine.models import cache_root
from treegrpo.fsutil import atomic_directory

__all__ = [
    "SHORT_TEMPLATE",
    "TAG_TOKENS",
    "ScratchConfig",
    "build_scratch_policy",
    "scratch_tokenizer",
    "world_texts",
]

SHORT_TEMPLATE = "Question: {question}\n"
"""The prompt of the from-scratch policy: it has no instruction following to rely on, so the
Search-R1 instructions would only cost tokens. The step format it learns is the same."""

TAG_TOKENS: tuple[str, ...] = tuple(
    f"<{c}{t}>" for t in ("think", "search", "answer", "information") for c in ("", "/")
)
"""The step tags, one token each."""

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[EOS]")
"""Ids 0, 1, 2: padding, unknown word, end of sequence."""

_WORD = re.compile(r"\w+|[^\w\s]")

BUILD_VERSION = 1
"""Part of the cache key: bump it whenever the build changes (the word splitting, the
pre-tokenizer, the fixed LlamaConfig fields), so no policy of an older build is reused."""


@dataclass(frozen=True)
class ScratchConfig:
    """Shape of the from-scratch Llama (the defaults: ~1.5M parameters over the ~5.5k words of
    the default world).

    - ``hidden_size`` / ``num_hidden_layers`` / ``num_attention_heads`` / ``intermediate_size``:
      the Llama's width, depth, heads and MLP width.
    - ``max_position_embeddings``: the longest sequence (prompt + every step), in tokens.
    - ``min_word_count``: words seen fewer times than this map to ``[UNK]`` (1 = every word).
    - ``seed``: the initial weights.
    """

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    min_word_count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < (0 if f.name == "seed" else 1):
                kind = "an integer >= 0" if f.name == "seed" else "a positive integer"
                raise ValueError(f"model.scratch.{f.name} must be {kind}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.scratch.hidden_size={self.hidden_size} must be a multiple of "
                f"model.scratch.num_attention_heads={self.num_attention_heads}"
            )


def world_texts(world: Path) -> list[str]:
    """Every text of a synthetic world the tokenizer must cover: corpus pages, questions and
    answers of both splits, gold episodes (actions and observations), the short template and
    the invalid-action message."""
    import pyarrow.parquet as pq

    from treegrpo.env.prompt import PromptBuilder
    from treegrpo.env.steps import INVALID_ACTION

    texts = [SHORT_TEMPLATE.replace("{question}", ""), INVALID_ACTION]
    builder = PromptBuilder(SHORT_TEMPLATE, use_chat_template=False)
    with (world / "corpus.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            texts.append(str(row.get("contents") or row.get("text") or ""))
    for split in ("train", "test"):
        for row in pq.read_table(world / f"{split}.parquet").to_pylist():
            texts.append(builder.text(str(row["question"])))  # as the prompt renders it
            texts.extend(str(g) for g in row["reward_model"]["ground_truth"]["target"])
    for row in pq.read_table(world / "sft.parquet").to_pylist():
        for step in row["steps"]:
            texts.extend((step["action"], step["observation"]))
    return texts


def scratch_tokenizer(texts: Iterable[str], *, min_word_count: int = 1) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``texts`` (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts: dict[str, int] = {}
    for text in texts:
        for word in _words(text):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_word_count)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # "\n" is a token; a space joins the word after it ("▁word"); punctuation stands alone.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Split(Regex(r"▁?\w+|▁?[^\w\s▁]|▁"), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )


def _words(text: str) -> list[str]:
    """The vocabulary entries of ``text``, as the pre-tokenizer splits it (tags aside)."""
    out: list[str] = []
    for i, part in enumerate(re.split(r"(<\/?(?:think|search|answer|information)>)", text)):
        if i % 2:  # a tag: an added token
            continue
        for k, line in enumerate(part.split("\n")):
            if k > 0:
                out.append("\n")
            pieces = line.split(" ")
            for j, piece in enumerate(pieces):
                prefix = "▁" if j > 0 else ""
                tokens = _WORD.findall(piece)
                if not tokens:
                    if j > 0:
                        out.append("▁")
                    continue
                out.append(prefix + tokens[0])
                out.extend(tokens[1:])
    return out


def build_scratch_policy(world: Path, cfg: ScratchConfig = ScratchConfig()) -> Path:
    """The from-scratch policy's checkpoint directory for ``world`` (built once, then cached).

    Returns a Hugging Face checkpoint directory (config, safetensors weights, tokenizer) with
    random weights, for :func:`treegrpo.engine.models.load_policy` and the warm start."""
    out = cache_root() / "models" / f"scratch-{_key(world, cfg)}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = scratch_tokenizer(world_texts(world), min_word_count=cfg.min_word_count)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"scratch_config": dataclasses.asdict(cfg), "world": str(world)}
        (tmp / "treegrpo_scratch.json").write_text(json.dumps(record, indent=2))
    return out


def _key(world: Path, cfg: ScratchConfig) -> str:
    h = hashlib.sha256()
    for name in ("corpus.jsonl", "train.parquet", "test.parquet", "sft.parquet"):
        h.update(hashlib.sha256((world / name).read_bytes()).digest())
    from treegrpo.env.steps import INVALID_ACTION

    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    # the other texts the vocabulary is built from, and the build itself
    h.update(json.dumps([SHORT_TEMPLATE, INVALID_ACTION, BUILD_VERSION]).encode())
    return h.hexdigest()[:16]
