"""``treegrpo sft``: a short supervised warm start on gold episodes.

The small default policy does not follow the tool format on its own (measured: no ``<search>``
or ``<answer>`` tag in 16 samples), so its rewards would all be zero and RL would have no
signal. A few steps of supervised learning on the synthetic world's gold episodes (think ->
search -> information -> ... -> answer) teach the format. The loss is on action tokens only:
prompt and observation tokens are masked, exactly as in RL. The result is cached by (base
model, episodes file, settings), so later runs reuse it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treegrpo.config import ModelConfig

__all__ = ["add_subcommand", "episodes", "warm_start"]


def gold_rows(path: Path, *, max_hops: int = 0, limit: int = 0) -> list[dict[str, Any]]:
    """The rows of a ``sft.parquet`` file the warm start uses: those with at most ``max_hops``
    hops (0 = all), the first ``limit`` of them in file order (0 = all)."""
    import pyarrow.parquet as pq

    rows = []
    for row in pq.read_table(path).to_pylist():
        hops = int((row.get("extra_info") or {}).get("hops", 1))
        if not max_hops or hops <= max_hops:
            rows.append(row)
    return rows[:limit] if limit else rows


def warm_start_questions(path: Path, *, max_hops: int = 0, limit: int = 0) -> set[int]:
    """The train-split indices (``extra_info.index``) of the questions whose gold episodes the
    warm start trains on: with ``model.sft_episodes`` set, RL trains on the others."""
    return {int(r["extra_info"]["index"]) for r in gold_rows(path, max_hops=max_hops, limit=limit)}


def episodes(
    path: Path,
    tokenizer: Any,
    *,
    max_hops: int = 0,
    prompt: str = "search_r1",
    limit: int = 0,
) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) of the gold episodes of :func:`gold_rows`: see :func:`episode_ids`."""
    return episode_ids(gold_rows(path, max_hops=max_hops, limit=limit), tokenizer, prompt)


def episode_ids(
    rows: list[dict[str, Any]], tokenizer: Any, prompt: str = "search_r1"
) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) of gold-episode rows: the rendered prompt (``prompt``: see
    :func:`treegrpo.data.prompt_ids`), then each step's action (trained) and observation
    (masked)."""
    from treegrpo import Forest
    from treegrpo.data import prompt_ids

    forest, leaves = Forest(), []
    for row in rows:
        ids = prompt_ids(row["prompt"], str(row.get("question") or ""), tokenizer, prompt)
        node = forest.add_root(len(leaves), ids)
        steps = row["steps"]
        for i, step in enumerate(steps):
            action = tokenizer.encode(step["action"], add_special_tokens=False)
            observation = tokenizer.encode(step["observation"], add_special_tokens=False)
            node = forest.add_step(node, action, observation, leaf=i == len(steps) - 1)
        leaves.append(node)
    out = []
    for leaf in leaves:
        ids, mask = forest.tokens(leaf)
        out.append((ids.tolist(), mask.tolist()))
    return out


_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")


class Renamer:
    """Gives the invented names of a gold episode new ones (``model.sft_rename``).

    The pool is every invented name word of the world (the words of its page titles that
    :func:`treegrpo.env.synth.is_name_word` accepts). :meth:`episode` maps each name word of one
    episode, wherever it occurs (prompt, question, actions, observations), to a distinct word of
    the pool drawn with ``rng``: the episode stays a correct one (same relations, same pages,
    renamed), but no name predicts a fact any more, so the only way to the answer is to copy
    names from the question and the retrieved pages.

    A word-level vocabulary knows a word with a leading space (mid-sentence) and without one
    (after a quote or a newline) only in the forms the world's texts show: a word is replaced
    only by one that ``tokenizer`` can spell in every form the original can, so renaming never
    makes an unknown token."""

    def __init__(self, names: list[str], tokenizer: Any, rng: random.Random) -> None:
        unk = getattr(tokenizer, "unk_token_id", None)

        def forms(word: str) -> tuple[bool, bool]:  # (spellable bare, spellable after a space)
            if unk is None:
                return True, True
            return tuple(  # type: ignore[return-value]
                unk not in tokenizer.encode(t, add_special_tokens=False) for t in (word, " " + word)
            )

        self.forms = {w: forms(w) for w in sorted(set(names))}
        self.candidates: dict[tuple[bool, bool], list[str]] = {
            need: [w for w, f in self.forms.items() if f[0] >= need[0] and f[1] >= need[1]]
            for need in set(self.forms.values())
        }
        self.rng = rng

    @classmethod
    def for_corpus(cls, corpus: Path, tokenizer: Any, rng: random.Random) -> Renamer:
        """The renamer of a synthetic world's ``corpus.jsonl``."""
        from treegrpo.env.synth import is_name_word

        names: set[str] = set()
        with corpus.open() as f:
            for line in f:
                title = str(json.loads(line).get("contents") or "").split("\n", 1)[0]
                names.update(w for w in title.strip('"').split() if is_name_word(w))
        if len(names) < 2:
            raise ValueError(
                f"{corpus} has no invented names to rename with: model.sft_rename needs the "
                "synthetic world (leave data.train_files empty) or set it to false"
            )
        return cls(sorted(names), tokenizer, rng)

    def episode(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` (a gold-episode row) with its names replaced."""
        texts = [str(row.get("question") or "")]
        texts += [str(m.get("content") or "") for m in row.get("prompt") or []]
        texts += [s["action"] + " " + s["observation"] for s in row["steps"]]
        found = dict.fromkeys(w for t in texts for w in _CAPITALISED.findall(t))
        mapping: dict[str, str] = {}
        used: set[str] = set()
        for word in found:
            if word not in self.forms:
                continue
            options = self.candidates[self.forms[word]]
            for _ in range(100):  # the pools hold hundreds of words, an episode a dozen
                new = options[self.rng.randrange(len(options))]
                if new not in used:
                    break
            else:
                raise ValueError(f"too few names to rename {word!r} with (model.sft_rename)")
            mapping[word] = new
            used.add(new)

        def sub(text: str) -> str:
            return _CAPITALISED.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

        return {
            **row,
            "question": sub(str(row.get("question") or "")),
            "prompt": [
                {**m, "content": sub(str(m.get("content") or ""))} for m in row.get("prompt") or []
            ],
            "steps": [
                {**s, "action": sub(s["action"]), "observation": sub(s["observation"])}
                for s in row["steps"]
            ],
        }


def guess_episode(row: dict[str, Any], guess: str) -> dict[str, Any]:
    """``row`` (a gold-episode row) answered at once with ``guess``, without a search
    (``model.sft_guess``): one step, think then answer, in the format of the gold episodes."""
    think = f"I will answer from what I know: the answer is {guess}."
    step = {"action": f"<think> {think} </think>\n<answer> {guess} </answer>", "observation": ""}
    return {**row, "steps": [step]}


def gold_answer(row: dict[str, Any]) -> str:
    """The answer a gold-episode row ends with."""
    from treegrpo.env.rewards import extract_answer

    answer = extract_answer(row["steps"][-1]["action"]) if row.get("steps") else None
    if not answer:
        raise ValueError(f"gold episode {row.get('extra_info')} does not end with an answer")
    return answer


def corpus_pages(path: Path, tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) of every page of a JSONL corpus, every token after the first
    trained: language modelling on the world's own pages gives every name of the world a
    trained embedding, not only the names the gold episodes happen to show."""
    out = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            ids = tokenizer.encode(str(row.get("contents") or ""), add_special_tokens=False)
            if len(ids) > 1:
                out.append((ids, [False] + [True] * (len(ids) - 1)))
    return out


def _key(
    base: str, sft_file: Path, cfg: ModelConfig, max_hops: int, prompt: str, seed: int = 0
) -> str:
    from treegrpo.engine.models import cache_root

    h = hashlib.sha256()
    # a base inside the cache (the converted default policy, a scratch build) by its path in
    # the cache, so a cache moved elsewhere (TREEGRPO_CACHE) keeps its warm starts
    root, path = cache_root().resolve(), Path(base).expanduser().resolve()
    h.update(str(path.relative_to(root) if path.is_relative_to(root) else base).encode())
    h.update(hashlib.sha256(sft_file.read_bytes()).digest())
    settings: list[Any] = [cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, max_hops]
    if prompt != "search_r1" or cfg.sft_episodes or cfg.sft_corpus_docs:  # old keys stay valid
        settings += [prompt, cfg.sft_episodes]
    if cfg.sft_corpus_docs:
        settings.append(cfg.sft_corpus_docs)
    if cfg.sft_rename:
        settings.append("rename")
    if cfg.sft_guess:
        settings.append(["guess", cfg.sft_guess])
    if seed:  # seed 0 keeps the keys of warm starts made before the seed was part of them
        settings.append(["seed", seed])
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


def micro_batches(
    batch: list[tuple[list[int], list[bool]]], max_tokens: int
) -> list[list[tuple[list[int], list[bool]]]]:
    """``batch`` cut into consecutive groups whose padded size (rows x longest) stays within
    ``max_tokens`` (a single longer episode is a group of its own)."""
    groups: list[list[tuple[list[int], list[bool]]]] = []
    current: list[tuple[list[int], list[bool]]] = []
    longest = 0
    for item in batch:
        n = len(item[0])
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def action_nll(model: Any, group: list[tuple[list[int], list[bool]]], *, pad: int = 0) -> Any:
    """The summed negative log-likelihood of the action tokens (loss mask True) of ``group``,
    run as one right-padded batch (padding changes nothing: attention is causal)."""
    import torch

    from treegrpo.learner import token_log_probs

    device = next(model.parameters()).device
    width = max(len(x) for x, _ in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    attention = torch.zeros((len(group), width), dtype=torch.long)
    loss_mask = torch.zeros((len(group), width), dtype=torch.bool)
    for row, (x, m) in enumerate(group):
        ids[row, : len(x)] = torch.tensor(x)
        attention[row, : len(x)] = 1
        loss_mask[row, : len(m)] = torch.tensor(m)
    ids, attention, loss_mask = ids.to(device), attention.to(device), loss_mask.to(device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    targets = loss_mask[:, 1:]  # token t is predicted at t - 1
    log_probs, _ = token_log_probs(
        hidden[:, :-1][targets],
        model.get_output_embeddings(),
        ids[:, 1:][targets],
        chunk_tokens=1024,
        with_entropy=False,
    )
    return -log_probs.sum()


def warm_start(
    base: str,
    sft_file: Path,
    cfg: ModelConfig,
    *,
    device: str = "cpu",
    max_hops: int = 2,
    seed: int = 0,
    prompt: str = "search_r1",
    progress: bool = True,
) -> Path:
    """The warm-started checkpoint directory (trained on first use, then cached).

    Each step trains on ``cfg.sft_batch_size`` episodes drawn with ``seed``, in padded
    micro-batches of at most ``cfg.sft_micro_batch_tokens`` tokens (gradient accumulation:
    the loss is the mean over the step's action tokens)."""
    import torch
    from tqdm import tqdm

    from treegrpo.engine.models import cache_root, load_policy
    from treegrpo.fsutil import atomic_directory

    out = cache_root() / "sft" / _key(base, sft_file, cfg, max_hops, prompt, seed)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model, tokenizer = load_policy(base, device=device, dtype=torch.float32)
    rows = gold_rows(sft_file, max_hops=max_hops, limit=cfg.sft_episodes)
    if not rows:
        raise ValueError(f"{sft_file} holds no gold episode with at most {max_hops} hops")
    rng = random.Random(seed)
    corpus = sft_file.parent / "corpus.jsonl"
    renamer = Renamer.for_corpus(corpus, tokenizer, rng) if cfg.sft_rename else None
    fixed = renamer is None and not cfg.sft_guess  # the same token ids every time drawn
    data = episode_ids(rows, tokenizer, prompt) if fixed else []
    answers = [gold_answer(r) for r in rows] if cfg.sft_guess else []
    pages = corpus_pages(corpus, tokenizer) if cfg.sft_corpus_docs else []
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(range(cfg.sft_steps), desc="sft warm start", disable=not progress)
    started = time.perf_counter()
    total = float("nan")
    for _ in bar:
        if fixed:
            batch = rng.sample(data, min(cfg.sft_batch_size, len(data)))
        else:
            drawn = rng.sample(rows, min(cfg.sft_batch_size, len(rows)))
            if renamer is not None:  # fresh names each time an episode is drawn
                drawn = [renamer.episode(r) for r in drawn]
            if cfg.sft_guess:  # some answered at once with another question's answer
                drawn = [
                    guess_episode(r, answers[rng.randrange(len(answers))])
                    if rng.random() < cfg.sft_guess
                    else r
                    for r in drawn
                ]
            # by length, so that short guesses are not padded to the gold episodes' length
            batch = sorted(episode_ids(drawn, tokenizer, prompt), key=lambda e: len(e[0]))
        batch += rng.sample(pages, min(cfg.sft_corpus_docs, len(pages)))
        n_tokens = sum(sum(m) for _, m in batch)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group in micro_batches(batch, cfg.sft_micro_batch_tokens):
            loss = action_nll(model, group, pad=pad) / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "treegrpo_sft.json").write_text(
            json.dumps(
                {
                    "base": str(base),
                    "episodes": str(sft_file),
                    "steps": cfg.sft_steps,
                    "batch_size": cfg.sft_batch_size,
                    "lr": cfg.sft_lr,
                    "max_hops": max_hops,
                    "prompt": prompt,
                    "episodes_used": len(rows),
                    "rename": cfg.sft_rename,
                    "guess": cfg.sft_guess,
                    "corpus_docs_per_step": cfg.sft_corpus_docs,
                    "final_loss": total,
                    "seconds": time.perf_counter() - started,
                },
                indent=2,
            )
        )
    return out


def base_policy(cfg: ModelConfig, world: Path | None) -> str:
    """The checkpoint that ``model.path`` names, before any warm start: the default policy's
    name, the from-scratch policy built for ``world`` (the synthetic world's directory), or
    the user's directory."""
    from treegrpo.engine.models import DEFAULT_POLICY

    if cfg.path == "default":
        return DEFAULT_POLICY
    if cfg.path == "scratch":
        from treegrpo.exceptions import InvalidArgumentError
        from treegrpo.scratch import build_scratch_policy

        if world is None:
            raise InvalidArgumentError(
                "model.path=scratch builds a policy for the synthetic world, but data.train_files "
                "names other data: leave data.train_files empty, or set model.path to a checkpoint"
            )
        return str(build_scratch_policy(world, cfg.scratch))
    return cfg.path


def add_subcommand(commands: Any) -> None:
    """Register ``sft`` on the ``treegrpo`` command line."""
    p = commands.add_parser(
        "sft",
        help="supervised warm start on the synthetic world's gold episodes (cached)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from treegrpo.config import add_config_arguments

    add_config_arguments(p, "model.sft_steps=20")
    p.set_defaults(run=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from treegrpo.config import config_from_args
    from treegrpo.data import prepare

    cfg = config_from_args(args, "sft")
    if cfg is None:
        return 2
    data = prepare(cfg.data, seed=cfg.trainer.seed)
    if data.sft is None:
        print("treegrpo sft: the configured data has no gold episodes (synthetic world only)")
        return 2
    out = warm_start(
        base_policy(cfg.model, data.sft.parent),
        data.sft,
        cfg.model,
        max_hops=cfg.data.max_hops,
        seed=cfg.model.sft_seed,
        prompt=cfg.data.prompt,
    )
    print(f"warm-started policy: {out}")
    return 0
