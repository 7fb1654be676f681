""":class:`Learner`: the policy update over a batch of trajectories, flat or tree-packed.

It reads a :class:`treegrpo.Pack` (or packs a :class:`treegrpo.Forest`) and knows no tree: the
tree only survives as an attention mask, per-token weights and the layout that Rust computed
(``rust/pack.rs``; ``Pack.layout``).

What one :meth:`Learner.step` does (docs/algorithm.md, section 4):

1. Split the trajectories into mini-batches of ``ppo_mini_batch_size`` whole prompts (verl's
   name and meaning: all of a prompt's trees in one mini-batch), and each mini-batch into
   micro-batches of at most ``micro_batch_tokens`` padded tokens (gradient accumulation).
2. Recompute ``old_log_probs`` with the current weights (eval mode, no grad), before any
   update of the step, for every mini-batch, and the frozen reference model's log-probs when
   ``kl_coef > 0``. A step that makes a single update skips the old pass: its own log-probs,
   detached, are the old ones (``reuse_on_policy_log_probs``).
3. For ``ppo_epochs`` x each mini-batch: per micro-batch, run the model body to hidden states,
   then lm_head + log-softmax chunk by chunk (``logprob_chunk_tokens``; recomputed in backward,
   so neither pass holds a (tokens x vocab) tensor for the batch); the loss is verl's dual-clip
   PPO loss with ratio ``exp(log_probs - old_log_probs)``, plus ``kl_coef`` x KL to the
   reference (low_var_kl = k3) minus ``entropy_coeff`` x entropy, aggregated by
   ``loss_agg_mode`` over the MINI-batch. Then clip the gradient norm and take one AdamW step
   (skipped when the loss or the gradient is not finite) and call ``on_step``.
4. Flat mode: one padded row per trajectory, the loss written as verl writes it. Packed mode:
   each distinct token once (shared prefixes run once), a tree attention mask, and the closed
   form per token ``-adv_pos*min(r, 1+eps_high) + adv_neg*min(max(r, 1-eps_low), c)`` plus
   ``token_weight`` x (k3 KL, -entropy): the same loss and gradient (docs/architecture.md,
   "Learner").
5. Learning rate: linear warmup then constant, advanced once per learner step (verl's
   ``get_constant_schedule_with_warmup``, stepped once per training step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from treegrpo._core import Forest, Pack
from treegrpo.config import LearnerConfig
from treegrpo.distributed import all_reduce_grads, all_reduce_max, all_reduce_sum, world
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError, TreeGRPOError
from treegrpo.learner.batches import STAT_KEYS, MicroBatch, StepBatch
from treegrpo.learner.logprobs import TokenLogProbs
from treegrpo.learner.mask import PACKED_IMPLS
from treegrpo.learner.plan import (
    Layout,
    empty_micro_batch,
    flat_micro_batches,
    packed_micro_batches,
)
from treegrpo.learner.sharding import fully_shard

__all__ = ["Learner", "NonFiniteLossError"]


class NonFiniteLossError(TreeGRPOError, FloatingPointError):
    """``max_nonfinite_updates`` optimizer updates in a row had a non-finite loss or gradient."""


class Learner:
    """Updates ``model`` (a transformers causal LM) from packed rollouts.

    ``ref_model``: the frozen reference for the KL loss; used (and, if None, copied from
    ``model`` at construction) only when ``config.kl_coef > 0``. ``on_step``: called after each
    optimizer update (e.g. the embedded engine's ``bump_weight_version``). ``hold``: a
    context-manager factory entered around each optimizer update and ``on_step`` (e.g.
    ``engine.exclusive``), so generation never sees half-updated weights.
    ``data_parallel``: this process is one rank of a torch.distributed group and ``step`` gets
    this rank's share of the batch; losses are normalised over the union of the shares and
    gradients summed over ranks, so the update equals one over the union batch
    (docs/architecture.md, "Data parallel"). Every rank must call ``step`` with the same
    number of trees. With ``config.strategy == "fsdp2"`` the model is sharded in place
    (``fully_shard``): its parameters become DTensors, so nothing else may run it (an engine
    needs its own copy, kept current with :meth:`model_state_dict`), and :meth:`step`,
    :meth:`model_state_dict`, :meth:`optimizer_state_dict` are collectives every rank calls.
    """

    def __init__(
        self,
        model: Any,
        config: LearnerConfig,
        *,
        ref_model: Any | None = None,
        on_step: Callable[[], Any] | None = None,
        hold: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        data_parallel: bool = False,
    ) -> None:
        self.model, self.config = model, config
        self.on_step, self.hold = on_step, hold
        if data_parallel and not torch.distributed.is_initialized():
            raise InvalidArgumentError(
                "data_parallel=True needs an initialised torch.distributed process group: start "
                "the run with torchrun (treegrpo.distributed.init_from_env)"
            )
        self.data_parallel = data_parallel and world().parallel
        self.device = next(model.parameters()).device
        self.attn_implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if config.packed and self.attn_implementation not in PACKED_IMPLS:
            raise InvalidOptionError(
                f"packed=True needs a tree attention mask, which attn_implementation="
                f"{self.attn_implementation!r} cannot take: load the model with "
                f"attn_implementation in {', '.join(map(repr, PACKED_IMPLS))}, or use packed=False"
            )
        if getattr(model.config, "final_logit_softcapping", None):
            raise InvalidArgumentError("models with final_logit_softcapping are not supported")
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.ref_model: Any | None = None
        if config.kl_coef > 0:  # copied before any sharding: the reference stays whole
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False).eval()
        # Every forward pass of the policy goes through this module, so that under FSDP2 its
        # hooks gather the embedding/lm_head/norm parameters (the root unit) for the whole
        # pass: lm_head runs outside the transformers body, chunk by chunk.
        self.policy = TokenLogProbs(model)
        self.fsdp = self.data_parallel and config.strategy == "fsdp2"
        if self.fsdp:
            fully_shard(self.policy)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self._bar: Any = None  # step()'s progress bar while it runs
        self.steps = 0  # learner steps taken: the LR schedule's position
        self.updates = 0  # optimizer updates applied
        self.skipped_updates = 0
        self._nonfinite_in_a_row = 0

    def __repr__(self) -> str:
        mode = "packed" if self.config.packed else "flat"
        return (
            f"Learner({mode}, steps={self.steps}, updates={self.updates}, "
            f"lr={self.config.lr_at(self.steps):.3g}, kl={'on' if self.ref_model else 'off'})"
        )

    # -- one step ------------------------------------------------------------------------------

    def step(self, data: Forest | Pack, *, progress: str | None = None) -> dict[str, float]:
        """One learner step on a rollout batch (a Forest after ``advantages()``, or its Pack):
        recompute old log-probs, then ``ppo_epochs`` x (prompts / ``ppo_mini_batch_size``)
        optimizer updates. Returns the step's metrics (verl names; means over the updates).
        ``progress``: the label of a progress bar over the step's forward passes (None: no
        bar)."""
        from tqdm import tqdm

        with tqdm(desc=progress, unit="pass", disable=progress is None) as bar:
            self._bar = bar
            try:
                return self.update(self.prepare(data, old_log_probs=None))
            finally:
                self._bar = None

    def prepare(self, data: Forest | Pack, *, old_log_probs: bool | None = True) -> StepBatch:
        """Plan the step's mini- and micro-batches and compute their old (and reference)
        log-probs with the current weights, in eval mode, for every mini-batch before any
        update. Without ``old_log_probs`` the loss uses each pass's own log-probs, detached:
        right only for the first update after this call. None (what :meth:`step` passes):
        computed unless the step makes one update and ``reuse_on_policy_log_probs`` is on.

        A mini-batch holds whole prompts, which a Forest records (its groups); a Pack does not,
        so with a ``ppo_mini_batch_size`` set, pass the Forest."""
        start = time.perf_counter()
        cfg = self.config
        tree_groups = None
        if isinstance(data, Forest):
            pack = data.pack(loss_agg_mode=cfg.loss_agg_mode)
            tree_groups = pack.layout["tree_group"]
        elif isinstance(data, Pack):
            pack = data
            if pack.loss_agg_mode != cfg.loss_agg_mode:
                raise InvalidArgumentError(
                    f"the pack's weights are for loss_agg_mode={pack.loss_agg_mode!r}, the learner "
                    f"uses {cfg.loss_agg_mode!r}: pack with "
                    f"forest.pack(loss_agg_mode={cfg.loss_agg_mode!r})"
                )
        else:
            raise TypeError(f"step() takes a treegrpo.Forest or Pack, got {type(data).__name__}")
        batch = self._plan(pack, tree_groups)
        if old_log_probs is None:
            one_update = cfg.ppo_epochs == 1 and len(batch.mini_batches) == 1
            old_log_probs = not (one_update and cfg.reuse_on_policy_log_probs)
        here = old_log_probs or self.ref_model is not None  # a pass per micro-batch here?
        if self._bar is not None:  # and one per micro-batch and epoch in update()
            passes = sum(len(mini) for mini in batch.mini_batches)
            self._bar.total = passes * (int(here) + cfg.ppo_epochs)
            self._bar.refresh()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for mb in batch.micro_batches if here else ():
                    if old_log_probs:
                        mb.old_log_probs = self._log_probs(self.model, mb)[0]
                    if self.ref_model is not None:
                        mb.ref_log_probs = self._log_probs(self.ref_model, mb)[0]
                    if self._bar is not None:
                        self._bar.update()
        finally:
            self.model.train(was_training)
        batch.prepare_s = time.perf_counter() - start
        return batch

    def update(self, batch: StepBatch) -> dict[str, float]:
        """The optimizer updates of one step on a prepared batch; advances the LR schedule."""
        cfg = self.config
        start = time.perf_counter()
        lr = cfg.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, list[float]] = {}
        skipped = 0
        was_training = self.model.training
        self.model.train()
        try:
            for _ in range(cfg.ppo_epochs):
                for mini in batch.mini_batches:
                    metrics = self._update(mini)
                    if metrics is None:
                        skipped += 1
                        continue
                    for key, value in metrics.items():
                        sums.setdefault(key, []).append(value)
        finally:
            self.model.train(was_training)
        self.steps += 1
        out = {key: float(np.mean(values)) for key, values in sums.items()}
        out["actor/lr"] = lr
        out["actor/updates"] = float(cfg.ppo_epochs * len(batch.mini_batches) - skipped)
        out["actor/skipped_updates"] = float(skipped)
        out["perf/total_tokens"] = float(batch.total_tokens)
        out["perf/unique_tokens"] = float(batch.unique_tokens)
        out["perf/forward_tokens"] = float(sum(mb.num_tokens for mb in batch.micro_batches))
        out["perf/padded_tokens"] = float(sum(mb.padded_tokens for mb in batch.micro_batches))
        out["timing_s/old_log_prob"] = batch.prepare_s
        out["timing_s/update_actor"] = time.perf_counter() - start
        return out

    def mini_batch_loss(
        self, mini: list[MicroBatch], *, backward: bool = True
    ) -> tuple[float, dict[str, float]]:
        """The loss of one mini-batch (sum of its micro-batches' scaled losses) and its metrics;
        with ``backward`` the gradients accumulate into the model's ``.grad``. Returns a
        non-finite loss as soon as a micro-batch has one (its backward is not run)."""
        total = 0.0
        sums: dict[str, float] = {}
        for mb in mini:
            with torch.set_grad_enabled(backward):
                log_probs, entropy = self._log_probs(self.model, mb, with_entropy=True)
                assert entropy is not None
                loss, stats = mb.loss(log_probs, entropy, self.config)
            value = float(loss.detach())
            total += value
            if not math.isfinite(value) and not self.fsdp:
                break  # its backward is not run (FSDP2: every rank runs every pass, see _plan)
            if backward and loss.requires_grad:  # not when the micro-batch has no loss token
                loss.backward()
            if self._bar is not None:
                self._bar.update()
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v
        if self.data_parallel:
            # The union's loss and metric sums (every share is already normalised by the
            # union's normaliser); a non-finite loss on any rank is seen by every rank.
            reduced = all_reduce_sum([total, *(sums.get(k, 0.0) for k in STAT_KEYS)])
            total, sums = reduced[0], dict(zip(STAT_KEYS, reduced[1:], strict=True))
        if not math.isfinite(total):
            return total, sums
        tokens = max(sums.get("tokens", 0.0), 1.0)
        metrics = {
            "actor/pg_loss": sums.get("pg_loss", 0.0),
            "actor/pg_clipfrac": sums.get("clipped", 0.0) / tokens,
            "actor/pg_clipfrac_lower": sums.get("clipped_lower", 0.0) / tokens,
            "actor/ppo_kl": sums.get("approx_kl", 0.0) / tokens,
            "actor/entropy": sums.get("entropy", 0.0),
        }
        if self.ref_model is not None:
            metrics["actor/kl_loss"] = sums.get("kl_loss", 0.0)
            metrics["actor/kl_coef"] = self.config.kl_coef
        return total, metrics

    def _update(self, mini: list[MicroBatch]) -> dict[str, float] | None:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.mini_batch_loss(mini, backward=True)
        grad_norm = float("nan")
        if math.isfinite(loss):
            if self.data_parallel and not self.fsdp:  # (FSDP2 reduce-scatters in backward)
                all_reduce_grads(self.params)  # the union batch's gradient, on every rank
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: already the global norm
                norm = norm.full_tensor()
            grad_norm = float(norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            self._nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            if self._nonfinite_in_a_row >= cfg.max_nonfinite_updates:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_a_row} updates in a row had a non-finite loss or "
                    f"gradient (last: {what}); check the rewards, the lr and the model's dtype"
                )
            warnings.warn(
                f"non-finite {what}: update skipped ({self._nonfinite_in_a_row} in a row, "
                f"{self.skipped_updates} in all)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self._nonfinite_in_a_row = 0
        with self.hold() if self.hold is not None else contextlib.nullcontext():
            self.optimizer.step()
            self.updates += 1
            if self.on_step is not None:
                self.on_step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["actor/grad_norm"] = grad_norm
        return metrics

    # -- forward passes ------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.config.autocast == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _log_probs(
        self, model: Any, mb: MicroBatch, *, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) (N,) of a micro-batch's loss tokens under ``model`` (the
        policy or the reference)."""
        mask = mb.model_mask(self.attn_implementation, next(model.parameters()).dtype)
        run = self.policy if model is self.model else TokenLogProbs(model)
        with self._autocast():
            return run(
                mb.input_ids,
                mask,
                mb.position_ids,
                mb.pred_index,
                mb.targets,
                chunk_tokens=self.config.logprob_chunk_tokens,
                temperature=self.config.temperature,
                with_entropy=with_entropy,
            )

    # -- state for checkpoints and weight sync -------------------------------------------------

    def model_state_dict(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """The policy's full (unsharded) weights, keyed as ``model.state_dict()``. Under FSDP2
        this gathers the shards (every rank must call it): on CPU, on rank 0 only (the other
        ranks get ``{}``) unless ``every_rank``, which gives every rank the full tensors on the
        model's device. Without sharding it is ``model.state_dict()`` (no copy)."""
        if not self.fsdp:
            return dict(self.model.state_dict())
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return dict(get_model_state_dict(self.model, options=options))

    def optimizer_state_dict(self) -> dict[str, Any]:
        """AdamW's full state keyed by parameter name (the same layout for every strategy, so
        a checkpoint resumes under another one). Under FSDP2 a collective: rank 0 gets it
        (on CPU), the other ranks ``{}``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        return dict(get_optimizer_state_dict(self.model, self.optimizer, options=options))

    def load_state_dicts(
        self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None
    ) -> None:
        """Load full weights (and optimizer state, as :meth:`optimizer_state_dict` gives it)
        into this learner's (possibly sharded) model and optimizer. Under FSDP2 every rank
        calls it with the full state dicts."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        if optimizer_state is not None:
            set_optimizer_state_dict(
                self.model, self.optimizer, optim_state_dict=optimizer_state, options=options
            )

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, pack: Pack, tree_groups: np.ndarray | None = None) -> StepBatch:
        cfg = self.config
        mode, budget, device = cfg.loss_agg_mode, cfg.micro_batch_tokens, self.device
        one_row = self.attn_implementation == "flex_attention"  # see packed_micro_batches
        lay = Layout(pack)
        full_norm = lay.norm(np.arange(lay.rows), mode)
        splits = self._mini_batch_trees(lay.num_trees, tree_groups)
        rows_of = [np.flatnonzero(np.isin(lay.row_tree, trees)) for trees in splits]
        sizes = [lay.size(rows, mode) for rows in rows_of]
        if self.data_parallel:
            # Each rank's share of mini-batch i is normalised by the normaliser of the union of
            # every rank's i-th mini-batch; the gradients are then summed over ranks.
            sizes = all_reduce_sum(sizes)
        minis: list[list[MicroBatch]] = []
        for trees, rows, size in zip(splits, rows_of, sizes, strict=True):
            mini_norm = max(size, 1.0)
            if cfg.packed:
                scale = full_norm / mini_norm
                packed = packed_micro_batches(
                    lay, trees, scale, one_row=one_row, budget=budget, device=device
                )
                minis.append(list(packed))
            else:
                flat = flat_micro_batches(
                    lay, rows, mini_norm, loss_agg_mode=mode, budget=budget, device=device
                )
                minis.append(list(flat))
        if self.fsdp:
            # Every forward and backward of a sharded model is a collective: each rank must run
            # as many micro-batches as the busiest one, so the others add empty ones.
            most = all_reduce_max([len(m) for m in minis])
            for mini, n in zip(minis, most, strict=True):
                mini.extend(empty_micro_batch(self.device) for _ in range(int(n) - len(mini)))
        return StepBatch(
            pack=pack,
            mini_batches=minis,
            total_tokens=pack.total_tokens,
            unique_tokens=pack.unique_tokens,
        )

    def _mini_batch_trees(self, num_trees: int, tree_groups: np.ndarray | None) -> list[np.ndarray]:
        """The packed trees of each mini-batch: the step's prompts (this rank's share, in order
        of first appearance) split into consecutive runs of equal size, each with all its
        prompts' trees. The number of runs is the same on every rank."""
        cfg = self.config
        trees = np.arange(num_trees)
        if cfg.ppo_mini_batch_size is None:
            return [trees]
        if tree_groups is None:
            raise InvalidArgumentError(
                f"ppo_mini_batch_size={cfg.ppo_mini_batch_size!r} splits a step by prompt, "
                "which a Pack does not record: pass the Forest to Learner.step / prepare"
            )
        groups = list(dict.fromkeys(tree_groups.tolist()))  # this rank's prompts, in order
        local = len(groups)
        total = local
        if self.data_parallel:
            most, fewest = all_reduce_max([float(local), float(-local)])
            if int(most) != -int(fewest):
                raise InvalidArgumentError(
                    f"ranks hold {-int(fewest)} to {int(most)} prompts: with "
                    "ppo_mini_batch_size every rank needs the same number of prompts"
                )
            total = int(all_reduce_sum([float(local)])[0])
        updates = cfg.updates_per_epoch(total, local)
        position = {g: i for i, g in enumerate(groups)}
        run = np.array([position[g] for g in tree_groups.tolist()]) * updates // max(local, 1)
        return [trees[run == i] for i in range(updates)]
