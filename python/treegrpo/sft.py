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
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treegrpo.config import ModelConfig

__all__ = ["add_subcommand", "episodes", "warm_start"]


def episodes(
    path: Path, tokenizer: Any, *, max_hops: int = 0
) -> list[tuple[list[int], list[bool]]]:
    """(token ids, loss mask) of every gold episode in a ``sft.parquet`` file: the rendered
    prompt, then each step's action (trained) and observation (masked)."""
    import pyarrow.parquet as pq

    from treegrpo import Forest
    from treegrpo.env.prompt import PromptBuilder

    table = pq.read_table(path).to_pylist()
    builder, forest, leaves = PromptBuilder(), Forest(), []
    for row in table:
        hops = int((row.get("extra_info") or {}).get("hops", 1))
        if max_hops and hops > max_hops:
            continue
        node = forest.add_root(len(leaves), builder.render_messages(row["prompt"], tokenizer))
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


def _key(base: str, sft_file: Path, cfg: ModelConfig, max_hops: int) -> str:
    h = hashlib.sha256()
    h.update(str(base).encode())
    h.update(hashlib.sha256(sft_file.read_bytes()).digest())
    h.update(json.dumps([cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, max_hops]).encode())
    return h.hexdigest()[:16]


def warm_start(
    base: str,
    sft_file: Path,
    cfg: ModelConfig,
    *,
    device: str = "cpu",
    max_hops: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """The warm-started checkpoint directory (trained on first use, then cached)."""
    import torch
    from tqdm import tqdm

    from treegrpo.engine.models import cache_root, load_policy
    from treegrpo.learner import token_log_probs

    out = cache_root() / "sft" / _key(base, sft_file, cfg, max_hops)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model, tokenizer = load_policy(base, device=device, dtype=torch.float32)
    data = episodes(sft_file, tokenizer, max_hops=max_hops)
    if not data:
        raise ValueError(f"{sft_file} holds no gold episode with at most {max_hops} hops")
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    body, head = model.get_decoder(), model.get_output_embeddings()
    bar = tqdm(range(cfg.sft_steps), desc="sft warm start", disable=not progress)
    started = time.perf_counter()
    for _ in bar:
        batch = rng.sample(data, min(cfg.sft_batch_size, len(data)))
        n_tokens = sum(sum(m) for _, m in batch)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # One episode per forward (gradient accumulation): attention activations grow with the
        # square of the length, and a batch of long episodes does not fit in memory on CPU.
        for x, m in batch:
            ids = torch.tensor([x], device=device)
            targets = torch.tensor(m[1:], device=device)  # token t is predicted at t - 1
            hidden = body(input_ids=ids).last_hidden_state[0, :-1]  # (T - 1, d)
            log_probs, _ = token_log_probs(
                hidden[targets], head, ids[0, 1:][targets], chunk_tokens=1024, with_entropy=False
            )
            loss = -log_probs.sum() / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
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
                    "final_loss": total,
                    "seconds": time.perf_counter() - started,
                },
                indent=2,
            )
        )
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    from treegrpo.engine.models import DEFAULT_POLICY

    cfg = config_from_args(args, "sft")
    if cfg is None:
        return 2
    data = prepare(cfg.data, seed=cfg.trainer.seed)
    if data.sft is None:
        print("treegrpo sft: the configured data has no gold episodes (synthetic world only)")
        return 2
    base = DEFAULT_POLICY if cfg.model.path == "default" else cfg.model.path
    out = warm_start(base, data.sft, cfg.model, max_hops=cfg.data.max_hops, seed=cfg.trainer.seed)
    print(f"warm-started policy: {out}")
    return 0
