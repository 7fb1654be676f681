"""Environment benchmark (issue 4): BM25 retrieval speed, locally and over HTTP.

Builds a synthetic 20,000-document corpus in wiki-18 format (fictional entities, ~100 words a
passage, seeded, so every run indexes the same bytes), then measures:

- index build (no cache) and index load from the disk cache;
- batched retrieval: one ``retrieve`` call over 2,000 queries (bm25s with ``n_threads`` 0 and 2),
  and calls of 16 queries; target >= 1,000 queries/s;
- single-query latency: ``retrieve([q])`` one at a time, p50 / p99;
- the HTTP server (``treegrpo serve-retriever``'s app, in this process) under load from a second
  process: an aiohttp client keeping 8 requests in flight for a few seconds, with batches of 1
  and of 16 queries; requests/s, queries/s, p50 / p99 latency.

Each number is the median over ``--repeats`` runs. Prints a table and writes
bench/results/env.json.

    .venv/bin/python bench/env.py [--docs 20000] [--repeats 5] [--duration 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import bm25s
import numpy as np
import scipy
from common import markdown_table, median_time, target, write_results
from treegrpo.env.retrievers import BM25Retriever, serving

TITLE = "Environment: BM25 retrieval, local and over HTTP"
ISSUE = 4
TARGET_QPS = 1_000.0
TARGET_LOAD_S = 1.0
SEED = 2025
NUM_QUERIES = 2_000
CONCURRENCY = 8


# --------------------------------------------------------------------------- synthetic corpus

KINDS = ["river", "city", "mountain", "band", "novel", "ship", "festival", "dynasty", "comet",
         "language", "bridge", "university", "painting", "kingdom", "island", "opera"]  # fmt: skip
ADJECTIVES = ["ancient", "northern", "coastal", "famous", "small", "royal", "hidden", "volcanic",
              "medieval", "modern", "remote", "sacred", "industrial", "tropical"]  # fmt: skip


def _words(rng: random.Random, count: int, syllables: list[str], lo: int, hi: int) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(lo, hi))))
    return sorted(out)


def make_corpus(path: Path, num_docs: int, seed: int = SEED) -> list[tuple[str, str]]:
    """Write ``num_docs`` wiki-18 lines to ``path``; return one (query, document id) per
    document, a question about a fact its passage states."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    syllables = [c + v + e for c in "bcdfghjklmnprstvz" for v in "aeiou" for e in ("", *"nrls")]
    names = _words(rng, num_docs, syllables, 2, 4)
    places = _words(rng, 2_000, syllables, 2, 3)
    people = _words(rng, 5_000, syllables, 2, 3)
    things = _words(rng, 3_000, syllables, 2, 3)
    # Filler vocabulary with Zipf-like frequencies, like running text.
    filler = np.array(_words(rng, 30_000, syllables, 1, 4))
    weights = 1.0 / np.arange(1, len(filler) + 1) ** 1.07
    weights /= weights.sum()

    def cap(word: str) -> str:
        return word[:1].upper() + word[1:]

    truth: list[tuple[str, str]] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            name, place, person = cap(names[i]), cap(rng.choice(places)), cap(rng.choice(people))
            kind, adj = rng.choice(KINDS), rng.choice(ADJECTIVES)
            thing, thing2, year = rng.choice(things), rng.choice(things), rng.randint(800, 2020)
            facts = [
                f"{name} is a {adj} {kind} in {place}.",
                f"It was founded in {year} by {person}.",
                f"{name} is known for its {thing} and its {thing2}.",
            ]
            noise = nrng.choice(filler, size=int(nrng.integers(60, 90)), p=weights)
            for start in range(0, len(noise), 12):
                facts.insert(rng.randint(1, len(facts)), " ".join(noise[start : start + 12]) + ".")
            contents = f'"{name}"\n' + " ".join(facts)
            f.write(json.dumps({"id": str(i), "contents": contents}) + "\n")
            question = rng.choice(
                [
                    f"who founded the {kind} {name}",
                    f"in which place is {name}",
                    f"what is {name} known for",
                    f"{adj} {kind} founded by {person} in {year}",
                ]
            )
            truth.append((question, str(i)))
    return truth


# --------------------------------------------------------------------------- load client


async def _client(url: str, batches: list[list[str]], concurrency: int, duration: float) -> dict:
    """Keep ``concurrency`` requests in flight for ``duration`` seconds (after a 0.5 s warm-up
    that is not counted); bounded in time and in count."""
    latencies: list[float] = []
    queries = 0
    errors = 0
    next_batch = 0
    warmup_end = time.perf_counter() + 0.5
    end = warmup_end + duration
    max_requests = 2_000_000
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_batch, queries, errors
            while time.perf_counter() < end and len(latencies) < max_requests:
                batch = batches[next_batch % len(batches)]
                next_batch += 1
                body = {"queries": batch, "topk": 3, "return_scores": True}
                start = time.perf_counter()
                async with session.post(url, json=body) as response:
                    payload = await response.json()
                done = time.perf_counter()
                if response.status != 200 or len(payload["result"]) != len(batch):
                    errors += 1
                elif start >= warmup_end:
                    latencies.append(done - start)
                    queries += len(batch)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - max(started, warmup_end)
    lat = np.array(latencies)
    return {
        "requests": len(latencies),
        "queries": queries,
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "queries_per_s": queries / elapsed,
        "p50_ms": float(np.percentile(lat, 50) * 1e3) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99) * 1e3) if len(lat) else None,
    }


def client_main(args: argparse.Namespace) -> int:
    questions = json.loads(Path(args.queries).read_text())
    b = args.batch
    batches = [questions[i : i + b] for i in range(0, len(questions) - b + 1, b)]
    result = asyncio.run(_client(args.client, batches, args.concurrency, args.duration))
    print(json.dumps(result))
    return 0


def run_client(url: str, queries_file: Path, batch: int, duration: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--client",
        url + "/retrieve",
        "--queries",
        str(queries_file),
        "--batch",
        str(batch),
        "--concurrency",
        str(CONCURRENCY),
        "--duration",
        str(duration),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurements


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times), q) * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5, help="runs per local measurement")
    ap.add_argument("--http-repeats", type=int, default=3, help="runs per HTTP load level")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per HTTP load run")
    ap.add_argument("--quick", action="store_true", help="2,000 documents, short runs, no JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/env.json)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    # The load client (run by the benchmark itself, as a second process).
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--queries", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client_main(args)
    if args.quick:
        args.docs, args.repeats, args.http_repeats, args.duration = 2_000, 2, 1, 1.0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="treegrpo-bench-env-") as tmp:
        tmp_path = Path(tmp)
        corpus_path = tmp_path / "corpus.jsonl"
        truth = make_corpus(corpus_path, args.docs)
        rng = random.Random(SEED + 1)
        sample = rng.sample(truth, min(NUM_QUERIES, len(truth)))
        questions = [q for q, _ in sample]
        queries_file = tmp_path / "queries.json"
        queries_file.write_text(json.dumps(questions))
        corpus_info = {
            "documents": args.docs,
            "bytes": corpus_path.stat().st_size,
            "mean_words": round(_mean_words(corpus_path), 1),
            "queries": len(questions),
            "mean_query_words": round(statistics.fmean(len(q.split()) for q in questions), 1),
        }
        print(f"corpus: {corpus_info}", flush=True)

        build_s, _, retriever = median_time(
            lambda: BM25Retriever.from_corpus(corpus_path, cache=False), 1
        )
        cache_dir = tmp_path / "cache"
        BM25Retriever.from_corpus(corpus_path, cache_dir=cache_dir)  # writes the cache
        load_s, load_times, loaded = median_time(
            lambda: BM25Retriever.from_corpus(corpus_path, cache_dir=cache_dir), args.repeats
        )
        assert loaded.loaded_from_cache
        print(f"build {build_s:.2f} s, load from cache {load_s:.3f} s", flush=True)

        # Correctness first: the document a question was made from should come back.
        results = retriever.retrieve(questions, 3)
        assert results == loaded.retrieve(questions, 3), "cached index disagrees with a fresh one"
        found = [{d.id for d in docs} for docs in results]
        hits = sum(doc_id in ids for (_, doc_id), ids in zip(sample, found, strict=True))
        recall = hits / len(sample)

        local: dict[str, Any] = {}
        for n_threads in (0, 2):
            retriever.n_threads = n_threads
            t, times, _ = median_time(lambda: retriever.retrieve(questions, 3), args.repeats)
            local[f"batch_all_threads{n_threads}"] = {"qps": len(questions) / t, "times_s": times}
        retriever.n_threads = 0
        chunks = [questions[i : i + 16] for i in range(0, len(questions), 16)]
        t, times, _ = median_time(lambda: [retriever.retrieve(c, 3) for c in chunks], args.repeats)
        local["batch16"] = {"qps": len(questions) / t, "times_s": times}
        p50s, p99s = [], []
        for _ in range(args.repeats):
            lat = []
            for q in questions[:1000]:
                s = time.perf_counter()
                retriever.retrieve([q], 3)
                lat.append(time.perf_counter() - s)
            p50s.append(percentile_ms(lat, 50))
            p99s.append(percentile_ms(lat, 99))
        local["single"] = {"p50_ms": statistics.median(p50s), "p99_ms": statistics.median(p99s)}
        print(f"local: { {k: round(v.get('qps', 0)) for k, v in local.items()} }", flush=True)

        http: dict[str, Any] = {}
        with serving(retriever, max_concurrency=4) as url:
            for batch in (1, 16):
                runs = [
                    run_client(url, queries_file, batch, args.duration)
                    for _ in range(args.http_repeats)
                ]
                assert all(r["errors"] == 0 for r in runs), runs
                http[f"batch{batch}"] = {
                    key: statistics.median(r[key] for r in runs)
                    for key in ("requests_per_s", "queries_per_s", "p50_ms", "p99_ms")
                } | {"runs": runs}
                print(f"http batch {batch}: {http[f'batch{batch}']['queries_per_s']:.0f} q/s")

    best_batched = max(local["batch_all_threads0"]["qps"], local["batch_all_threads2"]["qps"])
    passed_qps = best_batched >= TARGET_QPS
    passed_load = load_s < TARGET_LOAD_S

    def q(x: float) -> str:
        return f"{x:,.0f}"

    rows = [
        ["index build (no cache)", f"{build_s:.2f} s", "", ""],
        ["index load from cache", f"{load_s * 1e3:.0f} ms", f"< {TARGET_LOAD_S:g} s", passed_load],
        ["recall@3 of the source document", f"{recall:.3f}", "", ""],
        [
            f"batched, {len(questions):,} queries, n_threads=0",
            f"{q(local['batch_all_threads0']['qps'])} q/s",
            f">= {TARGET_QPS:,.0f} q/s",
            local["batch_all_threads0"]["qps"] >= TARGET_QPS,
        ],
        [
            f"batched, {len(questions):,} queries, n_threads=2",
            f"{q(local['batch_all_threads2']['qps'])} q/s",
            f">= {TARGET_QPS:,.0f} q/s",
            local["batch_all_threads2"]["qps"] >= TARGET_QPS,
        ],
        ["batches of 16 queries", f"{q(local['batch16']['qps'])} q/s", "", ""],
        [
            "single query latency p50 / p99",
            f"{local['single']['p50_ms']:.2f} / {local['single']['p99_ms']:.2f} ms",
            "",
            "",
        ],
    ]
    for batch in (1, 16):
        h = http[f"batch{batch}"]
        per_request = "1 query" if batch == 1 else f"{batch} queries"
        rows.append(
            [
                f"HTTP, {CONCURRENCY} in flight, {per_request}/request",
                f"{q(h['requests_per_s'])} req/s, {q(h['queries_per_s'])} q/s, "
                f"p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms",
                "",
                "",
            ]
        )
    table = markdown_table(
        ["measurement", "median", "target", "pass"],
        [[*r[:3], "" if r[3] == "" else ("yes" if r[3] else "NO")] for r in rows],
    )
    print()
    print(table)
    notes = [
        "Synthetic corpus: fictional entities, three facts each (kind, place, founder, year, "
        "things known for) among Zipf-distributed filler words; queries ask about one fact of "
        "one document. Tokenisation: bm25s, English stopwords, no stemming; k1=0.9, b=0.4.",
        "Local numbers call BM25Retriever.retrieve (tokenise, score, top-3, read the documents "
        "from the corpus file) in this process; medians over the repeats.",
        f"HTTP: the serve-retriever app (aiohttp, retrieval in a 4-thread pool) runs in this "
        f"process; the load comes from a second process (aiohttp client, {CONCURRENCY} requests "
        f"in flight, {args.duration:g} s per run after a 0.5 s warm-up, top 3 with scores); "
        "medians over the runs. Both processes share the machine's cores.",
    ]
    for note in notes:
        print("-", note)
    elapsed = time.perf_counter() - started
    print(f"\n(total {elapsed:.0f} s)")

    payload = {
        "title": TITLE,
        "issue": ISSUE,
        "versions": {
            "bm25s": bm25s.__version__,
            "aiohttp": aiohttp.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "repeats": args.repeats,
        "http_repeats": args.http_repeats,
        "corpus": corpus_info,
        "settings": {"topk": 3, "k1": 0.9, "b": 0.4, "concurrency": CONCURRENCY},
        "measured": {
            "build_s": build_s,
            "load_s": load_s,
            "load_times_s": load_times,
            "recall_at_3": recall,
            "local": local,
            "http": http,
        },
        "table": table,
        "notes": notes,
        "elapsed_s": round(elapsed, 1),
    }
    payload["targets"] = env_targets(payload)
    if not args.quick or args.out is not None:
        path = write_results("env", payload, args.out)
        print(f"wrote {path}")
    return 1 if args.check and not (passed_qps and passed_load) else 0


def env_targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's target and this benchmark's own (schema: bench/common.py), from the payload."""
    local, corpus = payload["measured"]["local"], payload["corpus"]
    qps = {n: local[f"batch_all_threads{n}"]["qps"] for n in (0, 2)}
    best = max(qps, key=lambda n: qps[n])
    return [
        target(
            f"BM25 batched queries, {corpus['documents']:,} documents",
            qps[best],
            ">=",
            TARGET_QPS,
            "q/s",
            note=f"one retrieve() of {corpus['queries']:,} queries, n_threads={best} "
            f"(the faster of 0 and 2)",
        ),
        target(
            "BM25 index load from the disk cache",
            payload["measured"]["load_s"],
            "<",
            TARGET_LOAD_S,
            "s",
            note="the benchmark's own target, not an issue's",
        ),
    ]


def _mean_words(path: Path, limit: int = 1000) -> float:
    counts = []
    with open(path, encoding="utf-8") as f:
        for _, line in zip(range(limit), f, strict=False):
            counts.append(len(json.loads(line)["contents"].split()))
    return statistics.fmean(counts)


if __name__ == "__main__":
    sys.exit(main())
