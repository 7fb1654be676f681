"""The learner on a tiny random Llama (float32, CPU): packed = flat, chunking, accumulation,
schedule, non-finite skips, config validation, and one sanity update."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import treegrpo
from reference import causal_union
from treegrpo import Forest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from treegrpo.learner import (  # noqa: E402
    Learner,
    LearnerConfig,
    NonFiniteLossError,
    token_log_probs,
    tree_attention_mask,
)

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
VOCAB = 97


def tiny_model(attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config).float()


def tree_forest(prompts: int = 2, m: int = 2, n: int = 2, seed: int = 0) -> Forest:
    """Tree-GRPO-shaped rollouts: per prompt M trees, each a first chain to a leaf plus N
    expansions from uniformly drawn nodes (root included), whole agent steps as nodes."""
    rng = random.Random(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]

    def chain(forest: Forest, node: int, leaves: list[int]) -> None:
        for _ in range(rng.randint(0, 2)):
            node = forest.add_step(node, tokens(2, 6), tokens(0, 4))
        leaves.append(forest.add_step(node, tokens(1, 5), leaf=True))

    forest, leaves = Forest(), []
    for group in range(prompts):
        prompt = tokens(3, 8)
        for _ in range(m):
            chain(forest, forest.add_root(group, prompt), leaves)
    for node in forest.select(n, seed=seed):
        chain(forest, node, leaves)
    rewards = [rng.choice([0.0, 0.2, 1.0]) for _ in leaves]
    rewards[:2] = [0.0, 1.0]  # both signs of advantage
    forest.set_rewards(leaves, rewards)
    forest.advantages("tree")
    return forest


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel(a: float | torch.Tensor, b: float | torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def config(**kw: object) -> LearnerConfig:
    """A test config: one update per epoch unless asked (the default, "auto", would split the
    test forests' prompts into several)."""
    return LearnerConfig(**{"total_steps": 10, "ppo_mini_batch_size": None, **kw})  # type: ignore[arg-type]


def perturbed_loss(
    model: torch.nn.Module,
    ref: torch.nn.Module,
    forest: Forest,
    noise: float = 0.5,
    **kw: object,
) -> tuple[float, dict[str, float], torch.Tensor]:
    """Old log-probs at the model's weights, then the loss and gradient of the first
    mini-batch after perturbing the weights (so that ratios leave the clip range)."""
    model = copy.deepcopy(model)
    learner = Learner(model, config(**kw), ref_model=ref)
    batch = learner.prepare(forest)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    loss, metrics = learner.mini_batch_loss(batch.mini_batches[0])
    return loss, metrics, grads(model)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_flat(mode: str, attn: str) -> None:
    model, forest = tiny_model(attn), tree_forest()
    ref = copy.deepcopy(model)
    kw = {"loss_agg_mode": mode, "kl_coef": 0.1, "entropy_coeff": 0.01}
    loss_f, met_f, grad_f = perturbed_loss(model, ref, forest, packed=False, **kw)
    # packed, in several micro-batches of whole trees, with small log-prob chunks
    loss_p, met_p, grad_p = perturbed_loss(
        model, ref, forest, packed=True, micro_batch_tokens=60, logprob_chunk_tokens=7, **kw
    )
    assert met_f["actor/pg_clipfrac"] > 0.2, "clipping is active"
    assert met_f["actor/pg_clipfrac_lower"] > 0, "the dual clip is active"
    assert met_f["actor/kl_loss"] > 0.1
    assert rel(loss_p, loss_f) <= 1e-5
    assert rel(grad_p, grad_f) <= 1e-5
    for key, value in met_f.items():
        assert met_p[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_tree_mask_is_the_union_of_causal_masks() -> None:
    pack = tree_forest().pack()
    packed = pack.packed
    seg = torch.from_numpy(packed["segment_ids"])
    end = torch.from_numpy(packed["subtree_end"])
    mask = tree_attention_mask(seg, end, attn_implementation="sdpa")
    assert mask.shape == (1, 1, pack.unique_tokens, pack.unique_tokens)
    expect = np.array(causal_union(pack), dtype=bool)
    assert (mask[0, 0].numpy() == expect).all()
    additive = tree_attention_mask(seg, end, attn_implementation="eager")
    assert ((additive[0, 0] == 0).numpy() == expect).all()
    with pytest.raises(treegrpo.InvalidOptionError, match="flex_attention"):
        tree_attention_mask(seg, end, attn_implementation="flash_attention_2")


def test_flex_block_mask_follows_the_same_rule() -> None:
    """The flex_attention BlockMask (built on CPU here; run on CUDA only) uses the one rule:
    its mask_mod over every (q, kv) is the union of causal masks, and its blocks cover it."""
    from torch.nn.attention.flex_attention import create_mask

    pack = tree_forest().pack()
    packed, u = pack.packed, pack.unique_tokens
    seg = torch.from_numpy(packed["segment_ids"])
    end = torch.from_numpy(packed["subtree_end"])
    block = tree_attention_mask(seg, end, attn_implementation="flex_attention")
    expect = np.array(causal_union(pack), dtype=bool)
    cells = create_mask(block.mask_mod, 1, None, u, u, device="cpu")
    assert (cells[0, 0].numpy() == expect).all()
    size = block.BLOCK_SIZE[0]
    blocks = block.to_dense()[0, 0].numpy().astype(bool)  # (q blocks, kv blocks)
    for q in range(u):
        for kv in range(u):
            if expect[q, kv]:
                assert blocks[q // size, kv // size], (q, kv)


def test_packed_forward_gives_the_flat_log_probs() -> None:
    model, forest = tiny_model(), tree_forest()
    pack = forest.pack()
    flat = pack.flat
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(flat["input_ids"]).long(),
            attention_mask=torch.from_numpy(flat["attention_mask"]).long(),
        ).logits
        expect = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, torch.from_numpy(flat["input_ids"][:, 1:, None]).long()
        )[..., 0][torch.from_numpy(flat["loss_mask"][:, 1:])]
    for packed in (True, False):
        learner = Learner(model, config(packed=packed, micro_batch_tokens=50, kl_coef=0.0))
        batch = learner.prepare(pack)
        got = dict.fromkeys(range(pack.unique_tokens), 0.0)
        for mb in batch.micro_batches:
            got.update(zip(mb.pack_index.tolist(), mb.old_log_probs.tolist(), strict=True))
        # flat loss positions -> their packed positions
        got_flat = torch.tensor([got[i] for i in flat["packed_index"][flat["loss_mask"]]])
        assert torch.allclose(got_flat, expect, atol=1e-5)


def test_chunked_log_probs_equal_unchunked() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    results = []
    for chunk in (1, 5, 23, 100):
        head.zero_grad()
        hidden.grad = None
        lp, ent = token_log_probs(hidden, head, targets, chunk_tokens=chunk, temperature=0.7)
        (lp.square().sum() + ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    logits = head(hidden.detach()).float() / 0.7
    expect_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    expect_ent = torch.distributions.Categorical(logits=logits).entropy()
    for lp, ent, g_hidden, g_head in results:
        torch.testing.assert_close(lp, expect_lp)
        torch.testing.assert_close(ent, expect_ent)
        torch.testing.assert_close(g_hidden, results[-1][2])
        torch.testing.assert_close(g_head, results[-1][3])


@pytest.mark.parametrize("packed", [False, True])
def test_micro_batches_accumulate_to_one_batch(packed: bool) -> None:
    model, forest = tiny_model(), tree_forest(prompts=3)
    out = {}
    for budget in (None, 40):
        m = copy.deepcopy(model)
        learner = Learner(m, config(packed=packed, micro_batch_tokens=budget, kl_coef=0.0))
        batch = learner.prepare(forest)
        out[budget] = (learner.mini_batch_loss(batch.mini_batches[0]), grads(m), batch)
    (loss_one, met_one), grad_one, one = out[None]
    (loss_many, met_many), grad_many, many = out[40]
    assert len(one.mini_batches[0]) == 1 < len(many.mini_batches[0])
    assert rel(loss_many, loss_one) <= 1e-5
    assert rel(grad_many, grad_one) <= 1e-5
    for key, value in met_one.items():
        assert met_many[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_mini_batches_hold_whole_prompts_and_normalise_each() -> None:
    forest = tree_forest(prompts=2, m=2)  # prompt 0: trees 0 and 1; prompt 1: trees 2 and 3
    learner = Learner(tiny_model(), config(ppo_mini_batch_size=1, kl_coef=0.0))
    batch = learner.prepare(forest)
    assert len(batch.mini_batches) == 2
    # each mini-batch's loss is normalised over itself: at ratio 1 the pg loss of a token-mean
    # mini-batch is minus its mean advantage per policy token
    pack = forest.pack()
    tree_of = {row["leaf"]: row["tree"] for row in _rows(forest.leaves())}
    flat = pack.flat
    for mini, trees in zip(batch.mini_batches, ([0, 1], [2, 3]), strict=True):
        _, metrics = learner.mini_batch_loss(mini, backward=False)
        rows = [i for i, leaf in enumerate(pack.leaves) if tree_of[leaf] in trees]
        mask = flat["loss_mask"][rows]
        expect = -(flat["advantages"][rows] * mask).sum() / mask.sum()
        assert metrics["actor/pg_loss"] == pytest.approx(expect, rel=1e-5, abs=1e-6)
    with pytest.raises(treegrpo.InvalidArgumentError, match="does not divide the step's 2"):
        Learner(tiny_model(), config(ppo_mini_batch_size=3, kl_coef=0.0)).prepare(forest)
    with pytest.raises(treegrpo.InvalidArgumentError, match="pass the Forest"):
        Learner(tiny_model(), config(ppo_mini_batch_size=1, kl_coef=0.0)).prepare(pack)


@pytest.mark.parametrize(
    ("prompts", "updates"), [(1, 1), (2, 2), (3, 3), (8, 8), (12, 6), (16, 8), (512, 8), (7, 7)]
)
def test_auto_mini_batches_follow_the_references_ratio(prompts: int, updates: int) -> None:
    assert LearnerConfig(warmup_steps=0).ppo_mini_batch_size == "auto"  # the default
    assert LearnerConfig(warmup_steps=0).updates_per_epoch(prompts) == updates
    # verl's meaning: prompts per update, over every rank; each rank's share splits evenly
    assert LearnerConfig(warmup_steps=0, ppo_mini_batch_size=64).updates_per_epoch(512) == 8
    assert LearnerConfig(warmup_steps=0).updates_per_epoch(16, per_rank=4) == 4
    with pytest.raises(treegrpo.InvalidArgumentError, match="split each data-parallel rank"):
        LearnerConfig(warmup_steps=0, ppo_mini_batch_size=3).updates_per_epoch(6, per_rank=3)


def reference_ppo_step(
    model: torch.nn.Module, forest: Forest, lr: float, *, stale_old: bool = False
) -> torch.nn.Module:
    """A slow, plain PPO step on ``forest`` with one mini-batch per prompt (in group order): per
    trajectory a full forward of its own tokens; old log-probs from the weights before the step
    (``stale_old``: wrongly, from the weights at each mini-batch, i.e. no recomputation before
    the step); the dual-clip loss per token, token-mean over the mini-batch; AdamW."""
    import polars as pl

    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    leaves = pl.DataFrame(forest.leaves()).filter(pl.col("kept")).sort("leaf")

    def log_probs(net: torch.nn.Module, leaf: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, adv = forest.trajectory(leaf)
        ids = torch.as_tensor(ids)
        logits = net(input_ids=ids[None]).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
        keep = torch.as_tensor(mask[1:])
        return lp[keep], torch.as_tensor(adv[1:])[keep]

    with torch.no_grad():
        before = {leaf: log_probs(model, leaf)[0] for leaf in leaves["leaf"]}
    for group in sorted(set(leaves["group"])):
        batch = leaves.filter(pl.col("group") == group)["leaf"].to_list()
        with torch.no_grad():
            old = {leaf: log_probs(model, leaf)[0] for leaf in batch} if stale_old else before
        total, tokens = 0.0, 0
        for leaf in batch:
            lp, adv = log_probs(model, leaf)
            ratio = torch.exp(lp - old[leaf])
            clipped = torch.clamp(ratio, 0.8, 1.2)
            loss = torch.maximum(-adv * ratio, -adv * clipped)
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * 3.0), loss)
            total = total + loss.sum()
            tokens += len(lp)
        opt.zero_grad()
        (total / tokens).backward()
        opt.step()
    return model


@pytest.mark.parametrize("packed", [True, False])
def test_old_log_probs_stay_those_before_the_step_over_several_updates(packed: bool) -> None:
    forest = tree_forest(prompts=2)
    model = tiny_model()
    lr = 3e-3
    cfg = config(
        ppo_mini_batch_size=1,  # 2 updates: the second one's weights differ from the old ones
        lr=lr,
        warmup_steps=0,
        kl_coef=0.0,
        entropy_coeff=0.0,
        grad_clip=None,
        packed=packed,
        reuse_on_policy_log_probs=True,  # a step with 2 updates must not reuse: it recomputes
    )
    learner = Learner(copy.deepcopy(model), cfg)
    metrics = learner.step(forest)
    assert metrics["actor/updates"] == 2
    assert metrics["actor/ppo_kl"] != 0  # the second update's ratios left 1
    ours = torch.cat([p.detach().flatten() for p in learner.model.parameters()])
    right = torch.cat(
        [p.detach().flatten() for p in reference_ppo_step(model, forest, lr).parameters()]
    )
    stale = reference_ppo_step(model, forest, lr, stale_old=True)
    wrong = torch.cat([p.detach().flatten() for p in stale.parameters()])
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert rel(ours - start, right - start) < 1e-4
    assert rel(wrong - start, right - start) > 5e-3  # the check tells the two apart (~2e-2)


def _rows(table: object) -> list[dict]:
    import polars as pl

    return pl.DataFrame(table).to_dicts()


def test_warmup_then_constant_lr() -> None:
    cfg = config(lr=1e-3, warmup_ratio=0.3, total_steps=10)  # int(0.3 * 10) = 3 warmup steps
    assert cfg.num_warmup_steps == 3
    expect = [0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3]
    assert [cfg.lr_at(k) for k in range(6)] == pytest.approx(expect)
    # verl: get_constant_schedule_with_warmup, stepped once per training step
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=3)
    verl = []
    for _ in range(6):
        verl.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert verl == pytest.approx(expect)
    assert config(warmup_steps=0, lr=2e-6).lr_at(0) == 2e-6
    assert LearnerConfig(warmup_ratio=0.0).lr_at(0) == 1e-6
    # the learner follows it, one value per step
    learner = Learner(tiny_model(), config(lr=1e-3, warmup_steps=2, kl_coef=0.0))
    forest = tree_forest(prompts=1)
    lrs = [learner.step(forest)["actor/lr"] for _ in range(3)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3])


def test_non_finite_loss_skips_the_update_and_raises_when_it_persists() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    learner = Learner(
        model,
        config(kl_coef=0.0, max_nonfinite_updates=3, ppo_mini_batch_size=None),
        on_step=lambda: calls.append(1),
    )
    forest = tree_forest(prompts=1)
    for expected in (1, 2):
        with pytest.warns(RuntimeWarning, match="non-finite loss: update skipped"):
            metrics = learner.step(forest)
        assert metrics["actor/skipped_updates"] == 1 and metrics["actor/updates"] == 0
        assert learner.skipped_updates == expected
    assert not calls and learner.updates == 0
    assert all(
        torch.equal(a, b) or (a.isnan() == b.isnan()).all()
        for a, b in zip(before, model.parameters(), strict=True)
    )
    assert not learner.optimizer.state, "no optimizer update happened"
    with pytest.raises(NonFiniteLossError, match="3 updates in a row"):
        learner.step(forest)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "LearnerConfig.lr must be a finite number > 0"),
        ({"lr": float("nan")}, "LearnerConfig.lr"),
        ({"weight_decay": -1.0}, "LearnerConfig.weight_decay must be a finite number >= 0"),
        ({"betas": (0.9, 1.0)}, r"LearnerConfig.betas must be two numbers in \[0, 1\)"),
        ({"warmup_ratio": 1.0}, r"LearnerConfig.warmup_ratio must be in \[0, 1\)"),
        ({"warmup_steps": -1}, "LearnerConfig.warmup_steps must be None or an int >= 0"),
        ({"grad_clip": 0.0}, "LearnerConfig.grad_clip must be None"),
        ({"clip_ratio_low": 1.0}, "LearnerConfig.clip_ratio_low"),
        ({"clip_ratio_c": 1.0}, "LearnerConfig.clip_ratio_c must be > 1"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode must be one of 'token-mean', "),
        ({"kl_type": "k3"}, "kl_type must be one of 'low_var_kl'"),
        ({"autocast": "fp8"}, "autocast must be one of"),
        ({"ppo_epochs": 0}, "LearnerConfig.ppo_epochs must be an int >= 1"),
        ({"ppo_mini_batch_size": 1.5}, "LearnerConfig.ppo_mini_batch_size"),
        ({"ppo_mini_batch_size": 0}, "LearnerConfig.ppo_mini_batch_size"),
        ({"ppo_mini_batch_size": "all"}, "LearnerConfig.ppo_mini_batch_size"),
        ({"micro_batch_tokens": 0}, "LearnerConfig.micro_batch_tokens must be None"),
        ({"logprob_chunk_tokens": 0}, "LearnerConfig.logprob_chunk_tokens"),
        ({"kl_coef": -0.1}, "LearnerConfig.kl_coef"),
        ({"temperature": 0.0}, "LearnerConfig.temperature"),
        ({"strategy": "fsdp"}, "strategy must be one of 'ddp', 'fsdp2'"),
    ],
)
def test_config_errors_name_the_field_and_the_valid_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


def test_config_needs_total_steps_for_a_warmup_ratio() -> None:
    with pytest.raises(treegrpo.InvalidArgumentError, match="total_steps is needed"):
        LearnerConfig()
    assert LearnerConfig(warmup_steps=10).num_warmup_steps == 10
    assert LearnerConfig(total_steps=180).num_warmup_steps == 51  # int(0.285 * 180)


def test_step_progress_bar_counts_every_forward_pass(capsys: pytest.CaptureFixture) -> None:
    cfg = config(warmup_steps=0, ppo_epochs=2, ppo_mini_batch_size=1, micro_batch_tokens=40)
    learner = Learner(tiny_model(), cfg)
    passes = sum(len(m) for m in learner.prepare(tree_forest(prompts=2)).mini_batches)
    assert passes > 2  # several micro-batches per mini-batch
    learner.step(tree_forest(prompts=2), progress="step 1 update")
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # old log-probs: one pass per micro-batch; then one per micro-batch and epoch
    assert bar.startswith("step 1 update: 100%") and f"{3 * passes}/{3 * passes}" in bar, bar
    learner.step(tree_forest(prompts=2))  # no label: no bar
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_one_update_steps_skip_the_old_log_prob_pass_with_the_same_update(kl_coef: float) -> None:
    forest = tree_forest(prompts=2)
    params, metrics, passes = [], [], []
    for reuse in (False, True):
        model = tiny_model()
        cfg = config(lr=1e-2, warmup_steps=0, kl_coef=kl_coef, reuse_on_policy_log_probs=reuse)
        learner = Learner(model, cfg)
        calls = []
        learner.policy.register_forward_hook(lambda *_: calls.append(1))  # noqa: B023
        metrics.append(learner.step(forest))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        passes.append(len(calls))
    micro = len(list(Learner(tiny_model(), config()).prepare(forest).micro_batches))
    assert passes == [2 * micro, micro]  # old log-probs + update, then the update alone
    assert rel(params[1], params[0]) < 1e-6
    for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/ppo_kl"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-7), key


def test_an_update_lowers_the_loss_on_a_fixed_batch() -> None:
    forest = tree_forest(prompts=2)
    model = tiny_model()
    learner = Learner(model, config(lr=3e-3, warmup_steps=0, kl_coef=0.0, grad_clip=None))
    batch = learner.prepare(forest)
    losses = []
    for _ in range(4):
        losses.append(learner.mini_batch_loss(batch.mini_batches[0], backward=False)[0])
        learner.update(batch)
    losses.append(learner.mini_batch_loss(batch.mini_batches[0], backward=False)[0])
    # each update lowers it until the PPO clip flattens it (ratios at 1 +- 0.2)
    assert losses[2] < losses[1] < losses[0], losses
    assert max(losses[1:]) < losses[0] - 0.1, losses


def test_step_wiring_modes_reference_and_metrics() -> None:
    model, forest = tiny_model(), tree_forest(prompts=2)
    events: list[str] = []

    class Hold:
        def __enter__(self) -> None:
            events.append("enter")

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    model.eval()
    learner = Learner(
        model,
        config(kl_coef=0.0, ppo_epochs=2, ppo_mini_batch_size=1, warmup_steps=0),
        on_step=lambda: events.append("on_step"),
        hold=Hold,
    )
    assert learner.ref_model is None, "no reference model without a KL loss"
    metrics = learner.step(forest)
    assert events == ["enter", "on_step", "exit"] * 4
    assert not model.training, "the caller's mode is restored"
    names = {
        "actor/pg_loss",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
    }
    assert names <= metrics.keys() and "actor/kl_loss" not in metrics
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["actor/updates"] == 4
    pack = forest.pack()
    assert metrics["perf/forward_tokens"] == pack.unique_tokens
    assert metrics["perf/total_tokens"] == pack.total_tokens
    with_kl = Learner(tiny_model(), config(kl_coef=0.01))
    assert with_kl.ref_model is not None and not with_kl.ref_model.training
    assert all(not p.requires_grad for p in with_kl.ref_model.parameters())
    assert "actor/kl_loss" in with_kl.step(forest)
    with pytest.raises(treegrpo.InvalidArgumentError, match="loss_agg_mode='token-mean'"):
        Learner(model, config(loss_agg_mode="seq-mean-token-sum")).prepare(pack)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention path: CUDA only")
def test_flex_attention_packed_equals_flat_on_cuda() -> None:
    forest = tree_forest(prompts=2)
    results = []
    for attn, packed in (("sdpa", False), ("flex_attention", True)):
        model = tiny_model(attn).cuda()
        learner = Learner(model, config(packed=packed, kl_coef=0.0, autocast="none"))
        batch = learner.prepare(forest)
        results.append((learner.mini_batch_loss(batch.mini_batches[0])[0], grads(model).cpu()))
    (loss_f, grad_f), (loss_p, grad_p) = results
    assert rel(loss_p, loss_f) <= 1e-4
    assert rel(grad_p, grad_f) <= 1e-4
