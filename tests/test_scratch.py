"""The from-scratch policy and the presets (issue 14): the word-level tokenizer, the cached
build, the batched warm start, preset errors, and a short `tiny` run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from treegrpo.config import DEFAULT_PRESET, PRESETS, ConfigError, load_config  # noqa: E402
from treegrpo.env.steps import INVALID_ACTION  # noqa: E402
from treegrpo.env.synth import synthesize  # noqa: E402
from treegrpo.scratch import (  # noqa: E402
    TAG_TOKENS,
    ScratchConfig,
    build_scratch_policy,
    scratch_tokenizer,
    world_texts,
)
from treegrpo.sft import action_nll, micro_batches  # noqa: E402

SMALL = ScratchConfig(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(out, seed=3, n_docs=80, n_train=24, n_test=12)
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tokenizer_round_trips_every_world_text(world: Path) -> None:
    texts = world_texts(world)
    tok = scratch_tokenizer(texts)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    # tags are single tokens that decoding never drops; an invented name is one token
    for tag in TAG_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    episode = next(t for t in texts if t.startswith("<think>"))
    ids = tok.encode(episode, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<think>"]  # a tag is one token
    name = json.loads((world / "corpus.jsonl").read_text().splitlines()[0])["contents"]
    name = name.splitlines()[0].strip('"').split()[0]
    assert len(tok.encode(" " + name, add_special_tokens=False)) == 1
    # a word the world never uses is unknown, not split into pieces
    assert tok.encode(" zzzqqq", add_special_tokens=False) == [tok.unk_token_id]
    assert len(tok) < 3000
    assert INVALID_ACTION in texts


def test_build_is_cached_deterministic_and_keyed(world: Path, cache: Path) -> None:
    first = build_scratch_policy(world, SMALL)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_scratch_policy(world, SMALL) == first  # cached: not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = build_scratch_policy(world, ScratchConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other != first  # the config is part of the key

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(first)
    b = AutoModelForCausalLM.from_pretrained(other)
    # rebuilt from scratch in a second cache: the same weights for the same seed
    import shutil

    shutil.rmtree(first)
    again = AutoModelForCausalLM.from_pretrained(build_scratch_policy(world, SMALL))
    for (name, p), q in zip(a.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_build_key_follows_the_world(tmp_path: Path, world: Path) -> None:
    other = tmp_path / "other-world"
    synthesize(other, seed=4, n_docs=80, n_train=24, n_test=12)
    assert build_scratch_policy(world, SMALL) != build_scratch_policy(other, SMALL)


def test_interrupted_build_leaves_no_cache_entry(
    world: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaForCausalLM

    def boom(self: object, *a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        build_scratch_policy(world, SMALL)
    models = cache / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_scratch_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.scratch\.hidden_size"):
        load_config(None, ["model.scratch.hidden_size=0"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(None, ["model.scratch.hidden_size=30", "model.scratch.num_attention_heads=4"])


def test_micro_batches_respect_the_token_bound() -> None:
    batch = [([0] * n, [True] * n) for n in (5, 9, 3, 12, 2, 7)]
    groups = micro_batches(batch, 20)
    assert [x for g in groups for x in g] == batch  # order kept, nothing lost
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(x) for x, _ in g) <= 20
    assert [len(g) for g in micro_batches(batch, 1)] == [1] * 6


def test_batched_action_loss_equals_one_episode_at_a_time(world: Path) -> None:
    from treegrpo.engine.models import load_policy
    from treegrpo.sft import episodes

    model, tok = load_policy(build_scratch_policy(world, SMALL))
    data = episodes(world / "sft.parquet", tok, prompt="short")[:5]
    assert len({len(x) for x, _ in data}) > 1  # padding is exercised
    batched = action_nll(model, data, pad=tok.pad_token_id)
    single = sum(action_nll(model, [x], pad=tok.pad_token_id) for x in data)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-4)


def test_presets() -> None:
    assert DEFAULT_PRESET == "tiny"
    cfg = load_config(None, [])
    assert cfg.preset == "tiny" and cfg.model.path == "scratch" and cfg.data.prompt == "short"
    assert cfg.data.val_size >= 200
    ref = load_config(None, ["preset=smollm2"])
    assert ref.model.path == "default" and ref.data.prompt == "search_r1"
    # the preset sits under the file and the overrides
    assert load_config(None, ["learner.lr=1e-5"]).learner.lr == 1e-5
    assert load_config(None, []).learner.lr == PRESETS["tiny"]["learner"]["lr"]


def test_unknown_preset_lists_the_valid_ones_before_anything_loads() -> None:
    with pytest.raises(ConfigError, match="valid presets: tiny, smollm2"):
        load_config(None, ["preset=huge"])
    # through the command line: exit 2, one line, no model loaded
    done = subprocess.run(
        [sys.executable, "-m", "treegrpo", "train", "preset=huge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "valid presets: tiny, smollm2" in done.stderr
    assert "Traceback" not in done.stderr


def test_world_too_small_for_the_held_out_questions(tmp_path: Path) -> None:
    from treegrpo.data import prepare

    cfg = load_config(
        None,
        ["data.synth_docs=80", "data.synth_train=24", "data.synth_test=12", "data.val_size=200"],
    )
    with pytest.raises(Exception, match=r"data\.val_size=200 .*raise data\.synth_test"):
        prepare(cfg.data)


def test_tiny_preset_trains_end_to_end(tmp_path: Path, cache: Path) -> None:
    """A miniature of the quickstart: build, warm start, 2 steps with validation before, in
    the middle and after, the learning-curve PNG and the closing line."""
    from treegrpo.train import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            "data.synth_docs=80",
            "data.synth_train=24",
            "data.synth_test=12",
            "data.val_size=4",
            "data.train_batch_size=2",
            "model.sft_steps=2",
            "model.sft_batch_size=4",
            *(f"model.scratch.{k}={v}" for k, v in SMALL.__dict__.items()),
            "tree.max_action_tokens=8",
            "trainer.total_steps=2",
            "trainer.val_every=1",
            f"trainer.run_dir={run}",
            "trainer.logger=[jsonl]",
        ],
    )
    with Trainer(cfg, progress=False) as trainer:
        trainer.setup()
        trainer.run()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    em_steps = [r["step"] for r in records if "val-core/all/acc/mean@1" in r]
    assert em_steps == [0, 1, 2]
    assert (run / "learning_curve.png").stat().st_size > 1000
    sft = next((cache / "sft").iterdir())
    info = json.loads((sft / "treegrpo_sft.json").read_text())
    assert info["prompt"] == "short" and Path(info["base"]).name.startswith("scratch-")


def test_warm_start_key_follows_every_setting(world: Path) -> None:
    from treegrpo.config import ModelConfig
    from treegrpo.sft import _key

    base, sft = "base", world / "sft.parquet"
    ref = _key(base, sft, ModelConfig(), 2, "short", 0)
    changed = [
        _key(base, sft, ModelConfig(), 2, "short", 1),  # model.sft_seed
        _key(base, sft, ModelConfig(sft_steps=9), 2, "short", 0),
        _key(base, sft, ModelConfig(sft_episodes=5), 2, "short", 0),
        _key(base, sft, ModelConfig(sft_corpus_docs=2), 2, "short", 0),
        _key(base, sft, ModelConfig(sft_rename=True), 2, "short", 0),
        _key(base, sft, ModelConfig(sft_guess=0.5), 2, "short", 0),
        _key(base, sft, ModelConfig(), 1, "short", 0),
        _key(base, sft, ModelConfig(), 2, "search_r1", 0),
        _key("other", sft, ModelConfig(), 2, "short", 0),
    ]
    assert ref not in changed and len(set(changed)) == len(changed)


def test_interrupted_world_build_leaves_no_world(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import treegrpo.env.synth as synth
    from treegrpo.data import synthetic_world

    def killed(out: Path, **kw: object) -> None:
        (Path(out) / "corpus.jsonl").write_text("{}\n")  # half a world
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", killed)
    cfg = load_config(None, ["data.synth_docs=80", "data.synth_train=24", "data.synth_test=12"])
    with pytest.raises(KeyboardInterrupt):
        synthetic_world(cfg.data)
    assert not (cache / "synth").exists() or list((cache / "synth").iterdir()) == []
    monkeypatch.undo()
    world = synthetic_world(cfg.data)  # the next run builds it whole
    assert (world / "sft.parquet").is_file() and (world / "corpus.jsonl").stat().st_size > 100


def test_build_key_follows_the_texts_and_the_build(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import treegrpo.env.steps as steps
    import treegrpo.scratch as scratch

    ref = scratch._key(world, SMALL)
    monkeypatch.setattr(steps, "INVALID_ACTION", "\nsomething else entirely\n")
    assert scratch._key(world, SMALL) != ref  # the invalid-action message is in the vocabulary
    monkeypatch.undo()
    monkeypatch.setattr(scratch, "BUILD_VERSION", scratch.BUILD_VERSION + 1)
    assert scratch._key(world, SMALL) != ref


def test_warm_start_key_survives_a_moved_cache(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treegrpo.config import ModelConfig
    from treegrpo.sft import _key

    keys = []
    for root in (tmp_path / "a", tmp_path / "b"):
        monkeypatch.setenv("TREEGRPO_CACHE", str(root))
        keys.append(
            _key(
                str(root / "models" / "scratch-x"), world / "sft.parquet", ModelConfig(), 2, "short"
            )
        )
    assert keys[0] == keys[1]
    assert keys[0] != _key(
        str(tmp_path / "c" / "x"), world / "sft.parquet", ModelConfig(), 2, "short"
    )


def _word_pairs(before: str, after: str) -> list[tuple[str, str]]:
    """Word-by-word pairs of a text and its renamed form (renaming swaps whole words only)."""
    import re

    a, b = re.split(r"(\W+)", before), re.split(r"(\W+)", after)
    assert len(a) == len(b), (before, after)
    assert a[1::2] == b[1::2], "renaming changed something other than words"
    return list(zip(a[::2], b[::2], strict=True))


def test_renamed_episodes_are_consistent_bijections_of_names(world: Path) -> None:
    import random

    from treegrpo.env.synth import is_name_word
    from treegrpo.sft import Renamer, episode_ids, gold_rows

    tokenizer = scratch_tokenizer(world_texts(world))
    rows = gold_rows(world / "sft.parquet")
    renamer = Renamer.for_corpus(world / "corpus.jsonl", tokenizer, random.Random(0))
    changed = 0
    for row in rows:
        new = renamer.episode(row)
        texts = [(row["question"], new["question"])]
        texts += [
            (m["content"], n["content"]) for m, n in zip(row["prompt"], new["prompt"], strict=True)
        ]
        for s, t in zip(row["steps"], new["steps"], strict=True):
            texts += [(s["action"], t["action"]), (s["observation"], t["observation"])]
        mapping: dict[str, str] = {}
        for before, after in texts:
            for a, b in _word_pairs(before, after):
                if a != b:
                    assert is_name_word(a) and is_name_word(b), (a, b)
                assert mapping.setdefault(a, b) == b, f"{a} renamed two ways"
        names = {a: b for a, b in mapping.items() if is_name_word(a)}
        assert len(set(names.values())) == len(names), "two names got the same new name"
        assert all(a == b for a, b in mapping.items() if not is_name_word(a))
        changed += sum(a != b for a, b in names.items())
        # the episode still answers its question: the renamed gold answer ends it
        answer = " ".join(names.get(w, w) for w in row["golds"][0].split())
        assert new["steps"][-1]["action"].endswith(f"<answer> {answer} </answer>")
    assert changed > 0.9 * sum(len(r["extra_info"]["chain"]) for r in rows)
    # every renamed episode is spelt with known words only
    renamed = episode_ids([renamer.episode(r) for r in rows], tokenizer, "short")
    assert all(tokenizer.unk_token_id not in ids for ids, _ in renamed)


def test_renaming_is_seeded_and_fresh_at_every_draw(world: Path) -> None:
    import random

    from treegrpo.sft import Renamer, gold_rows

    tokenizer = scratch_tokenizer(world_texts(world))
    row = gold_rows(world / "sft.parquet")[0]
    a = Renamer.for_corpus(world / "corpus.jsonl", tokenizer, random.Random(5))
    b = Renamer.for_corpus(world / "corpus.jsonl", tokenizer, random.Random(5))
    first, second = a.episode(row), a.episode(row)
    assert first == b.episode(row) and second == b.episode(row)
    assert first["question"] != second["question"] != row["question"]


def test_renaming_needs_the_synthetic_world(tmp_path: Path) -> None:
    import random

    from treegrpo.sft import Renamer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": '"the sea"\nwater'}) + "\n")
    with pytest.raises(ValueError, match=r"model\.sft_rename"):
        Renamer.for_corpus(corpus, scratch_tokenizer(["the sea water"]), random.Random(0))


def test_guess_episodes_answer_at_once_in_the_gold_format(world: Path) -> None:
    from treegrpo.env.rewards import extract_answer, is_valid_format
    from treegrpo.sft import episode_ids, gold_answer, gold_rows, guess_episode

    rows = gold_rows(world / "sft.parquet", max_hops=2)
    answers = {gold_answer(r) for r in rows}
    assert len(answers) > 1
    row, other = rows[0], next(r for r in rows if gold_answer(r) != gold_answer(rows[0]))
    guess = guess_episode(row, gold_answer(other))
    assert guess["question"] == row["question"] and guess["prompt"] == row["prompt"]
    (step,) = guess["steps"]  # no search: one step, no observation
    assert step["observation"] == "" and "<search>" not in step["action"]
    assert is_valid_format(step["action"])
    assert extract_answer(step["action"]) == gold_answer(other) != gold_answer(row)
    _, mask = episode_ids([guess], scratch_tokenizer(world_texts(world)), "short")[0]
    assert any(mask) and not mask[0]  # the answer is trained, the prompt is not


def test_sft_guess_must_be_a_share() -> None:
    from treegrpo.config import ModelConfig

    ModelConfig(sft_guess=0.0)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"model\.sft_guess must be in \[0, 1\)"):
            ModelConfig(sft_guess=bad)
