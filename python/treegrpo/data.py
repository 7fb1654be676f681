"""A run's data: training and validation questions, the corpus, gold episodes, the retriever
and the reward function, from the ``data`` and ``env`` sections of the config."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treegrpo.engine.models import cache_root
from treegrpo.env.datasets import Example, load_search_r1
from treegrpo.env.prompt import PromptBuilder
from treegrpo.env.rewards import compute_score, load_reward_fn
from treegrpo.exceptions import InvalidArgumentError
from treegrpo.rollout import Prompt

if TYPE_CHECKING:
    from treegrpo.config import DataConfig, EnvConfig

__all__ = ["VAL_SEED", "RunData", "prepare", "prompt_ids", "retriever", "reward_function"]

VAL_SEED = 0
"""The draw of the ``data.val_size`` validation questions: fixed, so runs that differ in
``trainer.seed`` are measured on the same questions."""


@dataclass
class RunData:
    """Questions (``train`` in a seeded ``order``, ``val``), the corpus path, and the gold
    episodes file for the warm start (None for user data without one)."""

    train: list[Example]
    val: list[Example]
    order: list[int]
    corpus: Path | None
    sft: Path | None

    style: str = "search_r1"

    def without(self, indices: set[int], *, seed: int) -> RunData:
        """These data with the training questions of these train-split indices
        (``extra_info.index``) left out, the rest in a new seeded order."""
        from dataclasses import replace

        train = [x for x in self.train if int(x.extra_info.get("index", -1)) not in indices]
        if not train:
            raise InvalidArgumentError(
                f"no training question is left for RL: the warm start uses all {len(self.train)} "
                "(lower model.sft_episodes, or raise data.synth_train)"
            )
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        return replace(self, train=train, order=order)

    def prompt(self, example: Example, tokenizer: Any) -> Prompt:
        """The rollout's view of a question: its rendered prompt ids and reward inputs."""
        ids = prompt_ids(example.prompt, example.question, tokenizer, self.style)
        return Prompt(
            group=example.group_id,
            input_ids=ids,
            data_source=example.data_source,
            ground_truth={"target": list(example.golds)},
            extra_info=dict(example.extra_info or {}),
        )


def prompt_ids(messages: Any, question: str, tokenizer: Any, style: str) -> list[int]:
    """Prompt token ids of a question. ``style`` (``data.prompt``): ``"search_r1"`` renders the
    row's own prompt messages (Search-R1's template, through the tokenizer's chat template when
    it has one); ``"short"`` renders :data:`treegrpo.scratch.SHORT_TEMPLATE` around the question
    as raw text (the from-scratch policy, which has neither instructions nor a chat template)."""
    if style == "short":
        from treegrpo.scratch import SHORT_TEMPLATE

        return PromptBuilder(SHORT_TEMPLATE, use_chat_template=False).render(question, tokenizer)
    return PromptBuilder().render_messages(messages, tokenizer)


def prepare(cfg: DataConfig, *, seed: int = 0) -> RunData:
    """Load the configured questions, or build the synthetic world once (cached by its
    parameters) when no training files are given. ``seed`` shuffles the training order."""
    if cfg.train_files:
        train = load_search_r1(cfg.train_files)
        val = load_search_r1(cfg.val_files) if cfg.val_files else []
        corpus = Path(cfg.corpus) if cfg.corpus else None
        sft = None
    else:
        world = synthetic_world(cfg)
        train, val = load_search_r1(world / "train.parquet"), load_search_r1(world / "test.parquet")
        corpus = Path(cfg.corpus) if cfg.corpus else world / "corpus.jsonl"
        sft = world / "sft.parquet"
        if cfg.max_hops:
            train = [x for x in train if int(x.extra_info.get("hops", 1)) <= cfg.max_hops]
            val = [x for x in val if int(x.extra_info.get("hops", 1)) <= cfg.max_hops]
    if not train:
        raise InvalidArgumentError("no training questions: check data.train_files / data.max_hops")
    # validation ids must not collide with training ids (they are separate groups)
    offset = max(x.group_id for x in train) + 1
    val = [_regroup(x, offset + i) for i, x in enumerate(val)]
    if cfg.val_size > len(val) and (val or not cfg.train_files):
        where = (
            f"the synthetic world (data.synth_test={cfg.synth_test}, data.max_hops="
            f"{cfg.max_hops}) has {len(val)}: raise data.synth_test"
            if not cfg.train_files
            else f"data.val_files hold {len(val)}: add validation files"
        )
        raise InvalidArgumentError(
            f"data.val_size={cfg.val_size} held-out questions requested, but {where}, or "
            "lower data.val_size (0 = all)"
        )
    if cfg.val_size:  # the same held-out questions whatever the run's seed
        val = _stratified(val, cfg.val_size, VAL_SEED)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    return RunData(train, val, order, corpus, sft, style=cfg.prompt)


def synthetic_world(cfg: DataConfig) -> Path:
    """The synthetic world's directory, generated on first use (deterministic per parameters)."""
    from treegrpo.env.synth import FILES_VERSION, synthesize

    name = f"seed{cfg.synth_seed}-docs{cfg.synth_docs}-train{cfg.synth_train}-test{cfg.synth_test}"
    name += f"-v{FILES_VERSION}"  # files of an older format are not reused
    out = cache_root() / "synth" / name
    if not (out / "sft.parquet").exists():
        import shutil

        from treegrpo.fsutil import atomic_directory

        if out.exists():  # a half-written world of a version that wrote in place
            shutil.rmtree(out)
        # built beside and renamed into place: a killed build leaves no world to reuse
        with atomic_directory(out) as tmp:
            synthesize(
                tmp,
                seed=cfg.synth_seed,
                n_docs=cfg.synth_docs,
                n_train=cfg.synth_train,
                n_test=cfg.synth_test,
            )
    return out


def retriever(cfg: EnvConfig, corpus: Path | None) -> Any:
    """The configured retriever (its index cached on disk); a remote one must answer now."""
    from treegrpo.env.retrievers import HttpRetriever, load_retriever

    if cfg.retriever == "http":
        assert cfg.retriever_url is not None  # EnvConfig requires it
        remote = HttpRetriever(cfg.retriever_url)
        remote.probe()  # a dead server fails the run now, before any model loads
        return remote
    if corpus is None:
        raise InvalidArgumentError(
            f"env.retriever={cfg.retriever} needs a corpus: set data.corpus to a JSONL file"
        )
    if not corpus.expanduser().is_file():
        raise InvalidArgumentError(
            f"data.corpus: no corpus file at {corpus}; set data.corpus to a JSONL file (one "
            '{"id", "contents"} object a line)'
        )
    return load_retriever(cfg.retriever, corpus.expanduser())


def reward_function(cfg: EnvConfig) -> Any:
    """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info=None)``."""
    if cfg.reward_fn:
        return load_reward_fn(cfg.reward_fn)
    shaped = cfg.format_reward

    def score(
        data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None
    ) -> float:
        return compute_score(
            data_source, solution_str, ground_truth, extra_info, format_shaped=shaped
        )

    return score


def _regroup(x: Example, group: int) -> Example:
    from dataclasses import replace

    return replace(x, group_id=group)


def _stratified(val: list[Example], n: int, seed: int) -> list[Example]:
    """The first `n` of a seeded shuffle, spread evenly over data sources."""
    by_source: dict[str, list[Example]] = {}
    for x in val:
        by_source.setdefault(x.data_source, []).append(x)
    rng = random.Random(seed)
    for xs in by_source.values():
        rng.shuffle(xs)
    out: list[Example] = []
    while len(out) < min(n, len(val)):
        for xs in by_source.values():
            if xs and len(out) < n:
                out.append(xs.pop())
    return sorted(out, key=lambda x: x.group_id)
