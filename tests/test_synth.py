from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from treegrpo.env.datasets import load_search_r1
from treegrpo.env.retrievers.bm25 import BM25Retriever
from treegrpo.env.rewards import em_check, extract_answer, is_valid_format, normalize_answer
from treegrpo.env.steps import parse_action, wrap_information
from treegrpo.env.synth import (
    KINDS,
    RELATIONS,
    SynthesisError,
    add_subcommand,
    build_world,
    gold_queries,
    gold_steps,
    synthesize,
)
from treegrpo.env.tools import format_documents
from treegrpo.env.types import Document
from treegrpo.exceptions import InvalidArgumentError


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth0")
    start = time.perf_counter()
    paths = synthesize(out, seed=0)
    seconds = time.perf_counter() - start
    print(f"synthesize(seed=0, default sizes) took {seconds:.2f} s")
    return paths, seconds


@pytest.fixture(scope="module")
def retriever(synth):
    paths, _ = synth
    return BM25Retriever.from_corpus(paths.corpus, cache=False)


def test_generation_is_fast(synth):
    _, seconds = synth
    assert seconds < 60  # about 1 s in practice, BM25 index build and gold retrieval included


def test_same_seed_same_files_and_another_seed_differs(synth, tmp_path):
    paths, _ = synth
    again = synthesize(tmp_path / "again", seed=0)
    assert again.corpus.read_bytes() == paths.corpus.read_bytes()
    for name in ("train", "test", "sft"):
        assert pq.read_table(getattr(again, name)).equals(pq.read_table(getattr(paths, name)))
        assert getattr(again, name).read_bytes() == getattr(paths, name).read_bytes()
    other = synthesize(tmp_path / "other", seed=1, n_docs=300, n_train=40, n_test=10)
    small = synthesize(tmp_path / "small", seed=0, n_docs=300, n_train=40, n_test=10)
    assert other.corpus.read_bytes() != small.corpus.read_bytes()
    assert not pq.read_table(other.train).equals(pq.read_table(small.train))


def test_sizes_hop_mix_and_answer_kinds(world):
    assert len(world.documents) == len(world.entities) == 2000
    assert (len(world.train), len(world.test)) == (1000, 200)
    assert Counter(q.hops for q in world.train) == {1: 250, 2: 350, 3: 250, 4: 150}
    assert Counter(q.hops for q in world.test) == {1: 50, 2: 70, 3: 50, 4: 30}
    kinds = Counter(world.entities[q.chain[-1]].kind for q in world.train)
    assert set(kinds) == set(KINDS)
    assert all(0.12 < n / len(world.train) < 0.28 for n in kinds.values()), kinds
    for q in world.train + world.test:
        assert q.data_source == f"synth_{q.hops}hop"
        assert len(q.chain) == q.hops + 1 and len(set(q.chain)) == len(q.chain)


def test_train_and_test_questions_are_disjoint(world):
    train = {q.question for q in world.train}
    test = {q.question for q in world.test}
    assert len(train) == 1000 and len(test) == 200 and not train & test
    paths = {(q.chain[0], q.relations) for q in world.train + world.test}
    assert len(paths) == 1200


def test_no_answer_appears_in_its_question(world):
    for q in world.train + world.test:
        assert f" {normalize_answer(q.answer)} " not in f" {normalize_answer(q.question)} "


def test_names_are_invented_and_unique(world):
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    words = [w for e in world.entities for w in e.name.split() if w not in _template_words()]
    # Every invented word is used once (a person's first and last names included).
    assert len({w.lower() for w in words}) == len(words)
    for w in words:
        assert w.isalpha() and 5 <= len(w) <= 9, w


def _template_words() -> set[str]:
    from treegrpo.env.synth import _ORG_KINDS, _WORK_FORMS

    return set(_ORG_KINDS) | {w for form in _WORK_FORMS for w in form.split() if w != "{}"}


def test_corpus_is_wiki18_jsonl(synth, world):
    paths, _ = synth
    lines = paths.corpus.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2000
    docs = [json.loads(line) for line in lines]
    assert [d["id"] for d in docs] == [str(i) for i in range(2000)]
    for d, e in zip(docs, world.entities, strict=True):
        title, text = d["contents"].split("\n", 1)
        assert title == f'"{e.name}"' and text.startswith(e.name)
        assert text.count(".") >= 2  # several facts per page


def test_each_hop_is_stated_on_the_page_it_starts_from(world):
    for q in world.train + world.test:
        for hop, rel in enumerate(q.relations):
            subject, obj = (world.entities[e] for e in q.chain[hop : hop + 2])
            assert RELATIONS[rel].subject == subject.kind and RELATIONS[rel].object == obj.kind
            assert subject.relations[rel] == obj.id
            assert obj.name in world.doc_of(subject.id).text
        assert q.answer == world.name(q.chain[-1])


def test_every_question_is_answerable_through_bm25(world, retriever):
    sample = world.test + random.Random(0).sample(world.train, 300)
    top1 = hops = 0
    for q in sample:
        results = retriever.retrieve(gold_queries(world, q), 3)
        for hop, docs in enumerate(results):
            ids = [d.id for d in docs]
            page = world.doc_of(q.chain[hop])
            assert page.id in ids, (q.question, hop, [d.title for d in docs])
            top1 += ids[0] == page.id
            hops += 1
            nxt = world.name(q.chain[hop + 1])
            assert nxt in docs[ids.index(page.id)].text
        assert q.answer in docs[ids.index(page.id)].text  # the last page holds the answer
    print(f"gold queries: hop page ranked first in {top1}/{hops}")
    assert top1 / hops > 0.95


def test_gold_episodes_are_valid_and_correct(synth, world, retriever):
    paths, _ = synth
    sft = pq.read_table(paths.sft).to_pylist()
    assert len(sft) == len(world.train)
    for row, q in zip(sft, world.train, strict=True):
        assert row["question"] == q.question and row["golds"] == [q.answer]
        assert row["group_id"] == q.index and row["data_source"] == q.data_source
        steps = row["steps"]
        assert len(steps) == q.hops + 1
        assert row["response"] == "".join(s["action"] + s["observation"] for s in steps)
        assert is_valid_format(row["response"])
        assert em_check(extract_answer(row["response"]), row["golds"]) == 1
        queries = gold_queries(world, q)
        for step, query in zip(steps[:-1], queries, strict=True):
            action = parse_action(step["action"])
            assert (action.kind, action.content) == ("tool", query)
            assert step["action"].startswith("<think>")
            assert step["observation"].startswith("\n\n<information>Doc 1(Title: ")
        last = parse_action(steps[-1]["action"])
        assert (last.kind, last.content, steps[-1]["observation"]) == ("answer", q.answer, "")
    # Observations are what the local retriever returns for the query (top 3), checked anew.
    for row, q in list(zip(sft, world.train, strict=True))[:50]:
        for step, query in zip(row["steps"], gold_queries(world, q), strict=False):
            docs = retriever.retrieve([query], 3)[0]
            assert step["observation"] == wrap_information(format_documents(docs))


def test_gold_steps_fail_loudly_when_the_page_is_not_retrieved(world):
    class Wrong:
        def retrieve(self, queries, topk=3):
            return [[Document("-1", '"Nowhere"\nnothing here')] for _ in queries]

    with pytest.raises(SynthesisError, match="did not retrieve the page"):
        gold_steps(world, world.test[0], Wrong())


def test_search_r1_loader_reads_the_splits_back(synth, world):
    paths, _ = synth
    examples = load_search_r1([paths.train, paths.test])
    assert len(examples) == 1200
    assert [e.group_id for e in examples] == list(range(1200))
    for ex, q in zip(examples, world.train + world.test, strict=True):
        assert (ex.question, ex.golds, ex.data_source) == (q.question, [q.answer], q.data_source)
        assert ex.extra_info["split"] == q.split and ex.extra_info["index"] == q.index
        assert ex.extra_info["hops"] == ex.extra_info["searches"] == q.hops
        assert ex.extra_info["relations"] == list(q.relations)
        assert ex.extra_info["chain"] == [world.name(e) for e in q.chain]
        assert ex.prompt[0]["role"] == "user"
        assert ex.prompt[0]["content"].endswith(f"Question: {q.question}\n")
    assert len(load_search_r1(paths.test, split="test")) == 200
    assert len(load_search_r1(paths.sft)) == 1000  # sft.parquet is a Search-R1 file too


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="treegrpo")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    argv = ["data", "synth", "--out", str(tmp_path), "--seed", "3", "--docs", "300"]
    args = parser.parse_args([*argv, "--train", "40", "--test", "10"])
    assert args.run(args) == 0
    assert "max_turns >= 4" in capsys.readouterr().out
    assert len(load_search_r1(tmp_path / "train.parquet")) == 40
    assert len((tmp_path / "corpus.jsonl").read_text().splitlines()) == 300
    with pytest.raises(SystemExit):
        parser.parse_args(["data"])


def test_bad_sizes_are_rejected():
    with pytest.raises(InvalidArgumentError, match="n_docs"):
        build_world(0, n_docs=10)
    with pytest.raises(InvalidArgumentError, match="n_train and n_test"):
        build_world(0, n_test=0)
    with pytest.raises(SynthesisError, match="too few"):
        build_world(0, n_docs=60, n_train=1000, n_test=1)
