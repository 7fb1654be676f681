"""A synthetic multi-hop QA world: `treegrpo data synth --out DIR --seed S`.

A seeded world of fictional people, cities, countries, organisations and works, tied by typed,
single-valued relations (a person is born in one city, an organisation has one founder...).
Everything the agent needs is in the corpus, nothing is in a pretrained model's head, so the
search tool is the only way to the answer and every question is checkable end to end.

1. Names are invented from syllables (seeded ``random.Random``): every name word is used once in
   the whole world (up to a trailing vowel or ``s``, so stemming cannot merge two names), and is
   neither in a list of common English words and first names nor a word of the templates. An
   entity's name is therefore a distinctive BM25 query for its own page.
2. One document per entity, in wiki-18 format (``'"Title"\\n' + text``). The text states that
   entity's relations as subject (plus a few attributes) and no others, so each hop of a question
   is answered by one document: the page of the entity the hop starts from.
3. A question follows a path of 1 to 4 relations from a start entity through distinct entities;
   it names only the start entity ("In which country is the city where the founder of Velmora
   Works was born?") and its answer is the last entity's name. The answer kind is drawn
   uniformly over the five entity kinds, so no kind dominates the answers.
4. Hop counts are mixed 1:2:3:4 = 25/35/25/15 % in each split; train and test questions are
   disjoint (distinct start entity + relation path, distinct text). `data_source` is
   ``synth_{hops}hop``, so validation reports accuracy per hop count.
5. A 4-hop question needs 4 searches: run such data with ``max_turns >= 4`` (the default of 3
   search turns cannot solve it). ``extra_info.searches`` records the searches each question needs.
6. Gold episodes (``sft.parquet``, train questions only): one search per hop, query = the hop's
   start entity name plus a relation word, observation = what the local BM25 retriever really
   returns (top 3); generation fails if a hop's page is not among them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from treegrpo.env.datasets import write_search_r1
from treegrpo.env.rewards import normalize_answer
from treegrpo.env.steps import wrap_information
from treegrpo.env.tools import format_documents
from treegrpo.env.types import Document, Retriever
from treegrpo.exceptions import InvalidArgumentError, SynthesisError

__all__ = [
    "FILES_VERSION",
    "HOP_MIX",
    "KINDS",
    "RELATIONS",
    "Entity",
    "Question",
    "Relation",
    "SynthPaths",
    "SynthesisError",
    "World",
    "add_subcommand",
    "add_synth_command",
    "build_world",
    "gold_queries",
    "gold_steps",
    "is_name_word",
    "synthesize",
]

KINDS = ("person", "city", "country", "organisation", "work")
HOP_MIX = (0.25, 0.35, 0.25, 0.15)  # share of 1-, 2-, 3- and 4-hop questions
# Share of each kind among the documents (works <= persons: every work has its own author).
_KIND_SHARE = {"person": 0.45, "city": 0.15, "country": 0.03, "organisation": 0.17, "work": 0.20}
_MIN_DOCS = 60
# Bumped whenever the files' content changes for the same parameters, so that caches keyed by
# the parameters (treegrpo.data.synthetic_world) are rebuilt: 2 = observations show each title
# line as it is, quotes kept (Search-R1's), in the gold episodes too.
FILES_VERSION = 2


@dataclass(frozen=True)
class Relation:
    """A typed, single-valued relation and the words that express it."""

    name: str
    subject: str  # kind of the entity whose page states the fact
    object: str  # kind of the value
    facts: tuple[str, ...]  # sentences for the subject's page: {s} subject, {o} object
    phrases: tuple[str, ...]  # noun phrases for the value, nested in questions: {x} subject
    questions: tuple[str, ...]  # questions asking for the value: {x} subject
    hint: str  # word added to the entity name in a gold search query


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "born_in",
            "person",
            "city",
            ("{s} was born in {o}.", "{s} was born in the city of {o}."),
            ("the birthplace of {x}", "the city where {x} was born"),
            ("In which city was {x} born?", "Where was {x} born?"),
            "birthplace",
        ),
        Relation(
            "works_for",
            "person",
            "organisation",
            ("{s} works for {o}.", "{s} is employed by {o}."),
            ("the employer of {x}", "the organisation {x} works for"),
            ("Which organisation does {x} work for?", "Who employs {x}?"),
            "employer",
        ),
        Relation(
            "spouse",
            "person",
            "person",
            ("{s} is married to {o}.", "{s} has been married to {o} for many years."),
            ("the spouse of {x}",),
            ("Who is {x} married to?", "Who is the spouse of {x}?"),
            "spouse",
        ),
        Relation(
            "mentor",
            "person",
            "person",
            ("{s} was mentored by {o}.", "{s} trained under the mentorship of {o}."),
            ("the mentor of {x}",),
            ("Who mentored {x}?", "Who was the mentor of {x}?"),
            "mentor",
        ),
        Relation(
            "notable_work",
            "person",
            "work",
            ("{s} is best known for writing {o}.", "The best-known work of {s} is {o}."),
            ("the best-known work of {x}",),
            ("What is the best-known work of {x}?", "Which work is {x} best known for?"),
            "best-known work",
        ),
        Relation(
            "headquartered_in",
            "organisation",
            "city",
            ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}."),
            ("the city where {x} is headquartered", "the headquarters city of {x}"),
            ("In which city is {x} headquartered?", "Where is {x} headquartered?"),
            "headquarters",
        ),
        Relation(
            "founded_by",
            "organisation",
            "person",
            ("{s} was founded by {o}.", "{o} founded {s}."),
            ("the founder of {x}",),
            ("Who founded {x}?", "Who was the founder of {x}?"),
            "founder",
        ),
        Relation(
            "written_by",
            "work",
            "person",
            ("{s} was written by {o}.", "The author of {s} is {o}."),
            ("the author of {x}",),
            ("Who wrote {x}?", "Who is the author of {x}?"),
            "author",
        ),
        Relation(
            "published_by",
            "work",
            "organisation",
            ("{s} was published by {o}.", "{o} published {s}."),
            ("the publisher of {x}",),
            ("Which organisation published {x}?", "Who published {x}?"),
            "publisher",
        ),
        Relation(
            "located_in",
            "city",
            "country",
            ("{s} is located in the country of {o}.", "{s} is a city in the country of {o}."),
            ("the country where {x} is located", "the country that {x} is in"),
            ("In which country is {x}?", "In which country is {x} located?"),
            "country",
        ),
        Relation(
            "capital",
            "country",
            "city",
            ("The capital of {s} is {o}.", "{o} is the capital of {s}."),
            ("the capital of {x}",),
            ("What is the capital of {x}?", "Which city is the capital of {x}?"),
            "capital",
        ),
    )
}
# Relations that lead straight back to the entity they start from are never chained.
_INVERSE = {
    ("notable_work", "written_by"),
    ("written_by", "notable_work"),
    ("spouse", "spouse"),
    ("capital", "located_in"),
}

_OCCUPATIONS = (
    "painter", "physician", "engineer", "historian", "merchant", "botanist", "sculptor",
    "lawyer", "astronomer", "composer", "teacher", "architect", "cartographer", "weaver",
    "chemist", "poet", "shipwright", "banker", "diplomat", "geologist",
)  # fmt: skip
_ORG_KINDS = ("Works", "Institute", "Foundation", "Guild", "Press", "Company", "Society", "Bank")
_ORG_SECTORS = (
    "shipbuilding", "publishing", "banking", "textiles", "glassmaking", "printing",
    "mining", "astronomy", "medicine", "education", "brewing", "clockmaking", "railways",
)  # fmt: skip
_WORK_FORMS = ("The {} Codex", "The {} Chronicle", "Songs of {}", "Letters from {}",
               "The {} Ledger", "Tales of {}", "The {} Almanac", "An Elegy for {}")  # fmt: skip
_GENRES = ("novel", "poem cycle", "play", "treatise", "memoir", "travelogue", "essay collection")
_FEATURES = ("river port", "hill town", "market town", "harbour city", "mountain town",
             "university town", "fortified town", "lake town")  # fmt: skip
_LANDSCAPES = ("wide plains", "dense forests", "high mountains", "long coasts", "salt marshes",
               "river valleys", "rolling hills", "dry steppes")  # fmt: skip

# Syllables for invented names; repeats weight the draw.
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
           "dr", "kr", "tr", "st", "th", "sh", "k", "t", "r", "l", "m", "n", "v", "d")  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "a", "i", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "", "", "", "", "", "n", "r", "l", "m", "th", "nd", "rn", "sk", "x", "v")
_SUFFIXES = {
    "country": ("ia", "ora", "esh", "ahn", "eth", "ovia", "aria", "und"),
    "city": ("", "", "mar", "ven", "dor", "gard", "wyn", "ost"),
}
# Common English words an invented name must not be (the template words are added at import).
_COMMON = """about above after again against along also among another answer around asked
basin began begin being below better between black board body book born bring brother brought
build built called came cannot carry cause center certain change child children city class
close cold color come common complete could country course cover dark daughter days didn does
done door down draw during early earth east eight enough even ever every example face fall
family farm father feel field final find fine fire first fish five follow food foot force form
found four free friend from front full game gave general girl give given gold good govern great
green ground group grow hair half hand happen hard have head hear heard heart heat held help here
high hold home horse hour house human hundred idea inch island just keep kind king know land
large last later laugh lead learn leave left less letter life light like line list listen little
live long look lord love made main make many mark master matter mean melon lemon metal might mile
mind minute miss money month moon more morning most mother mountain move much music must name
near need never next night north note nothing notice number ocean offer often open order other
over page paper part pass people perhaps person picture piece place plain plan plant play point
poor power present problem produce pull question quick rain reach read ready real record region
remember rest river road robin rock room round rule safe said salon same sand saw school science
second seem sentence serve seven shall shape ship short should show side silver simple since
sing sister size slow small snow some song soon sound south space speak special spell stand star
start state stay step still stone stood story street strong study such summer sure table tail
take talk teach tell test than that their them then there these thing think third this those
though thought three through time today together token told tone took tool total toward town
travel tree true turn under unit until upon usual valley very voice vowel wait walk want warm
watch water wave weather week weight well went were west what wheel when where which while white
whole wide wife will wind window winter with woman wonder wood word work world would write
wrote year young zero adam anna alan bella brian carol daniel david diana edward ella emma eric
hannah helen henry irene jason kara karen laura linda lisa maria mary mona nina olga paul peter
rosa sara sarah susan tara thomas tina vera""".split()


@dataclass
class Entity:
    """One fictional entity: its page states ``relations`` (relation name -> entity id)."""

    id: int
    kind: str
    name: str
    short: str  # how the page refers to it after the first sentence
    attrs: dict[str, str] = field(default_factory=dict)
    relations: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    """A question, its answer, and the path that answers it: ``chain[i]`` --relations[i]-->
    ``chain[i + 1]``; the page of ``chain[i]`` answers hop ``i``."""

    split: str
    index: int
    question: str
    answer: str
    relations: tuple[str, ...]
    chain: tuple[int, ...]  # entity ids, start entity first, answer last

    @property
    def hops(self) -> int:
        return len(self.relations)

    @property
    def data_source(self) -> str:
        return f"synth_{self.hops}hop"


@dataclass
class World:
    """The in-memory world: entities (one document each, same order) and the questions."""

    seed: int
    entities: list[Entity]
    documents: list[Document]
    train: list[Question]
    test: list[Question]

    def doc_of(self, entity_id: int) -> Document:
        return self.documents[entity_id]

    def name(self, entity_id: int) -> str:
        return self.entities[entity_id].name


@dataclass(frozen=True)
class SynthPaths:
    """The files `synthesize` writes."""

    corpus: Path
    train: Path
    test: Path
    sft: Path


# --- names --------------------------------------------------------------------------------


def _template_words() -> set[str]:
    texts: list[str] = [*_OCCUPATIONS, *_ORG_KINDS, *_ORG_SECTORS, *_WORK_FORMS, *_GENRES]
    texts += [*_FEATURES, *_LANDSCAPES]
    for r in RELATIONS.values():
        texts += [*r.facts, *r.phrases, *r.questions, r.hint]
    words: set[str] = set()
    for text in texts:
        words.update("".join(c if c.isalpha() else " " for c in text.lower()).split())
    return words


_BLOCKED = set(_COMMON) | _template_words()


def is_name_word(word: str) -> bool:
    """Whether ``word`` (one word of an entity's name, as it appears in a page title) is an
    invented name word rather than a template word ("The", "Press", "Songs", "of"...)."""
    return word[:1].isupper() and word.isalpha() and word.lower() not in _BLOCKED


class _Names:
    """Unique, pronounceable invented words."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.keys: set[str] = set()

    def word(self, kind: str = "", syllables: tuple[int, ...] = (2, 2, 3)) -> str:
        rng = self.rng
        for _ in range(10_000):
            parts = []
            for i in range(rng.choice(syllables)):
                onset = rng.choice(_ONSETS) if i else rng.choice((*_ONSETS, "", "", ""))
                parts.append(onset + rng.choice(_NUCLEI) + rng.choice(_CODAS))
            word = "".join(parts) + rng.choice(_SUFFIXES.get(kind, ("",)))
            # One key per name up to a trailing s / vowel: a stemmer cannot merge two names.
            key = word.rstrip("s").rstrip("aeiouy")
            if (
                5 <= len(word) <= 9
                and not word.endswith("s")
                and "yy" not in word
                and not any(c * 3 in word for c in set(word))
                and word not in _BLOCKED
                and len(key) >= 3
                and key not in self.keys
            ):
                self.keys.add(key)
                return word.capitalize()
        raise SynthesisError("ran out of invented names; lower n_docs")


# --- the world ----------------------------------------------------------------------------


def _kind_counts(n_docs: int) -> dict[str, int]:
    counts = {k: max(3, round(n_docs * _KIND_SHARE[k])) for k in KINDS}
    counts["person"] += n_docs - sum(counts.values())  # persons absorb the rounding
    return counts


def _entities(rng: random.Random, n_docs: int) -> list[Entity]:
    names = _Names(rng)
    counts = _kind_counts(n_docs)
    ents: list[Entity] = []

    def add(kind: str, name: str, short: str, **attrs: str) -> Entity:
        ent = Entity(len(ents), kind, name, short, dict(attrs))
        ents.append(ent)
        return ent

    countries = [
        add(
            "country",
            n := names.word("country"),
            n,
            population=f"{rng.randint(2, 90)} million",
            landscape=rng.choice(_LANDSCAPES),
        )
        for _ in range(counts["country"])
    ]
    cities = [
        add(
            "city",
            n := names.word("city"),
            n,
            feature=rng.choice(_FEATURES),
            founded=str(rng.randint(900, 1700)),
            population=f"{rng.randint(8, 900) * 1000:,}",
        )
        for _ in range(counts["city"])
    ]
    orgs = [
        add(
            "organisation",
            n := f"{names.word()} {rng.choice(_ORG_KINDS)}",
            n,
            sector=rng.choice(_ORG_SECTORS),
            founded=str(rng.randint(1750, 1990)),
            staff=f"{rng.randint(2, 400) * 25:,}",
        )
        for _ in range(counts["organisation"])
    ]
    persons = []
    for _ in range(counts["person"]):
        first, last = names.word(syllables=(2,)), names.word()
        persons.append(
            add(
                "person",
                f"{first} {last}",
                last,
                occupation=rng.choice(_OCCUPATIONS),
                born=str(rng.randint(1800, 1990)),
            )
        )
    works = [
        add(
            "work",
            n := rng.choice(_WORK_FORMS).format(names.word()),
            n,
            genre=rng.choice(_GENRES),
            year=str(rng.randint(1820, 2010)),
        )
        for _ in range(counts["work"])
    ]

    for country in countries:
        others = [c for c in countries if c is not country]
        country.attrs["borders"] = " and ".join(c.name for c in rng.sample(others, 2))
    # Cities: every country gets at least one; its first city is its capital.
    homes = countries + [rng.choice(countries) for _ in range(len(cities) - len(countries))]
    rng.shuffle(homes)
    for city, country in zip(cities, homes, strict=True):
        city.relations["located_in"] = country.id
        country.relations.setdefault("capital", city.id)
    for org in orgs:
        org.relations["headquartered_in"] = rng.choice(cities).id
        org.relations["founded_by"] = rng.choice(persons).id
    for person in persons:
        person.relations["born_in"] = rng.choice(cities).id
        person.relations["works_for"] = rng.choice(orgs).id
    # Spouses: 40% of persons in pairs. Mentors: 60% of persons, from earlier in a random order
    # (no cycles), never their spouse.
    order = persons[:]
    rng.shuffle(order)
    married = order[: int(0.4 * len(order)) // 2 * 2]
    for a, b in zip(married[::2], married[1::2], strict=True):
        a.relations["spouse"], b.relations["spouse"] = b.id, a.id
    rng.shuffle(order)
    for i, person in enumerate(order[1:], start=1):
        if rng.random() < 0.6:
            mentor = order[rng.randrange(i)]
            if person.relations.get("spouse") != mentor.id:
                person.relations["mentor"] = mentor.id
    # Works: each has its own author, whose best-known work it is.
    for work, author in zip(works, rng.sample(persons, len(works)), strict=True):
        work.relations["written_by"] = author.id
        work.relations["published_by"] = rng.choice(orgs).id
        author.relations["notable_work"] = work.id
    return ents


def _intro(e: Entity) -> str:
    a = e.attrs
    if e.kind == "person":
        article = "an" if a["occupation"][0] in "aeiou" else "a"
        return f"{e.name} (born {a['born']}) is {article} {a['occupation']}."
    if e.kind == "city":
        return (
            f"{e.name} is a {a['feature']} founded in {a['founded']}, "
            f"with a population of {a['population']}."
        )
    if e.kind == "country":
        return (
            f"{e.name} is a country of {a['landscape']} "
            f"with a population of {a['population']}. It borders {a['borders']}."
        )
    if e.kind == "organisation":
        return (
            f"{e.name} is an organisation in {a['sector']}, established in {a['founded']}, "
            f"with a staff of {a['staff']}."
        )
    return f"{e.name} is a {a['genre']} first published in {a['year']}."


def _document(e: Entity, ents: list[Entity], rng: random.Random) -> Document:
    facts = []
    for rel, obj in e.relations.items():
        template = rng.choice(RELATIONS[rel].facts)
        facts.append(template.format(s=e.short, o=ents[obj].name))
    rng.shuffle(facts)
    text = " ".join([_intro(e), *facts])
    return Document(id=str(e.id), contents=f'"{e.name}"\n{text}')


def _statement(rel: str, subject: str, obj: str) -> str:
    """The fact as the gold reasoning restates it."""
    return RELATIONS[rel].facts[0].format(s=subject, o=obj).rstrip(".")


def _hop_counts(n: int) -> list[int]:
    raw = [n * p for p in HOP_MIX]
    counts = [int(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _questions(
    rng: random.Random, ents: list[Entity], sizes: dict[str, int]
) -> dict[str, list[Question]]:
    """Questions per split, drawn from a random walk over relations with rejection on the
    answer kind; (start entity, path) pairs and question texts are unique across splits."""
    seen_paths: set[tuple[int, tuple[str, ...]]] = set()
    seen_texts: set[str] = set()
    out: dict[str, list[Question]] = {}
    for split, n in sizes.items():
        wanted = [h for h, c in enumerate(_hop_counts(n), start=1) for _ in range(c)]
        rng.shuffle(wanted)
        qs: list[Question] = []
        for hops in wanted:
            target = rng.choice(KINDS)
            for _ in range(100_000):
                start = rng.choice(ents)
                chain: list[int] = [start.id]
                rels: list[str] = []
                while len(rels) < hops:
                    here = ents[chain[-1]]
                    options = [
                        r
                        for r, obj in here.relations.items()
                        if obj not in chain and (not rels or (rels[-1], r) not in _INVERSE)
                    ]
                    if not options:
                        break
                    rel = rng.choice(sorted(options))
                    rels.append(rel)
                    chain.append(here.relations[rel])
                if len(rels) < hops or ents[chain[-1]].kind != target:
                    continue
                key = (start.id, tuple(rels))
                text = _question_text(rng, start.name, rels)
                answer = ents[chain[-1]].name
                if key in seen_paths or text in seen_texts or _mentions(text, answer):
                    continue
                seen_paths.add(key)
                seen_texts.add(text)
                qs.append(Question(split, len(qs), text, answer, tuple(rels), tuple(chain)))
                break
            else:
                raise SynthesisError(
                    f"could not draw a new {hops}-hop question: {len(ents)} documents are too "
                    f"few for {n} {split} questions; raise n_docs or ask for fewer questions"
                )
        out[split] = qs
    return out


def _question_text(rng: random.Random, start: str, rels: Sequence[str]) -> str:
    phrase = start
    for rel in rels[:-1]:
        phrase = rng.choice(RELATIONS[rel].phrases).format(x=phrase)
    return rng.choice(RELATIONS[rels[-1]].questions).format(x=phrase)


def _mentions(question: str, answer: str) -> bool:
    """Whether the normalised answer appears, word-bounded, in the normalised question."""
    return f" {normalize_answer(answer)} " in f" {normalize_answer(question)} "


def build_world(seed: int = 0, n_docs: int = 2000, n_train: int = 1000, n_test: int = 200) -> World:
    """The world for ``seed``: ``n_docs`` entities (one document each), ``n_train`` train and
    ``n_test`` test questions. Pure and deterministic: same arguments, same world."""
    if n_docs < _MIN_DOCS:
        raise InvalidArgumentError(f"n_docs must be >= {_MIN_DOCS}, got {n_docs}")
    if n_train < 1 or n_test < 1:
        raise InvalidArgumentError(
            f"n_train and n_test must be >= 1 (each split is a file), got {n_train}, {n_test}"
        )
    rng = random.Random(f"treegrpo-synth-{seed}")
    ents = _entities(rng, n_docs)
    docs = [_document(e, ents, rng) for e in ents]
    qs = _questions(rng, ents, {"train": n_train, "test": n_test})
    return World(seed, ents, docs, qs["train"], qs["test"])


# --- gold episodes --------------------------------------------------------------------------


def gold_queries(world: World, q: Question) -> list[str]:
    """One search query per hop: the hop's start entity name and a relation word."""
    pairs = zip(q.chain[:-1], q.relations, strict=True)
    return [f"{world.name(e)} {RELATIONS[r].hint}" for e, r in pairs]


def gold_steps(
    world: World, q: Question, retriever: Retriever, topk: int = 3
) -> list[tuple[str, str]]:
    """A correct episode for ``q`` as (action, observation) steps: one search per hop, then the
    answer (observation ``""``). Raises `SynthesisError` if a hop's page is not in the
    retriever's top ``topk``."""
    return _episodes(world, [q], retriever, topk)[0]


def _episodes(
    world: World, questions: Sequence[Question], retriever: Retriever, topk: int
) -> list[list[tuple[str, str]]]:
    queries = [gold_queries(world, q) for q in questions]
    flat = retriever.retrieve([x for qs in queries for x in qs], topk)  # one batch
    episodes, at = [], 0
    for q, qs in zip(questions, queries, strict=True):
        episodes.append(_steps(world, q, qs, flat[at : at + len(qs)]))
        at += len(qs)
    return episodes


def _steps(
    world: World, q: Question, queries: list[str], results: list[list[Document]]
) -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []
    known = ""  # what the last observation told us, restated
    for hop, (rel, query, docs) in enumerate(zip(q.relations, queries, results, strict=True)):
        subject, obj = world.name(q.chain[hop]), world.name(q.chain[hop + 1])
        if world.doc_of(q.chain[hop]).id not in [d.id for d in docs]:
            raise SynthesisError(
                f"{q.split} question {q.index} hop {hop + 1}: the query {query!r} did not "
                f"retrieve the page of {subject!r} (got {[d.title for d in docs]})"
            )
        need = RELATIONS[rel].phrases[0].format(x=subject)
        think = f"{known}I need to find {need}, so I will search for {subject}."
        action = f"<think> {think} </think>\n<search> {query} </search>"
        steps.append((action, wrap_information(format_documents(docs))))
        known = f"The search results say that {_statement(rel, subject, obj)}. "
    think = f"{known}So the answer to the question is {q.answer}."
    steps.append((f"<think> {think} </think>\n<answer> {q.answer} </answer>", ""))
    return steps


# --- files ----------------------------------------------------------------------------------


def _record(world: World, q: Question) -> dict[str, Any]:
    return {
        "question": q.question,
        "golds": [q.answer],
        "data_source": q.data_source,
        "split": q.split,
        "index": q.index,
        "extra_info": {
            "hops": q.hops,
            "searches": q.hops,  # searches a solution needs: run 4-hop data with max_turns >= 4
            "relations": list(q.relations),
            "chain": [world.name(e) for e in q.chain],
            "chain_ids": [world.doc_of(e).id for e in q.chain],
            "answer_kind": world.entities[q.chain[-1]].kind,
            "seed": world.seed,
        },
    }


def synthesize(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_docs: int = 2000,
    n_train: int = 1000,
    n_test: int = 200,
    *,
    topk: int = 3,
) -> SynthPaths:
    """Build the world for ``seed`` and write it under ``out_dir``: ``corpus.jsonl``,
    ``train.parquet`` and ``test.parquet`` (Search-R1 format), and ``sft.parquet``: the train
    questions again, each with a gold episode (columns ``steps``: list of ``{action,
    observation}``, ``response``: the steps joined, ``golds``, ``group_id``).

    Gold observations come from a BM25 index of the corpus (in memory, nothing cached) with
    ``topk`` results, as the local retriever serves them."""
    world = build_world(seed, n_docs=n_docs, n_train=n_train, n_test=n_test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = SynthPaths(
        corpus=out / "corpus.jsonl",
        train=out / "train.parquet",
        test=out / "test.parquet",
        sft=out / "sft.parquet",
    )
    with paths.corpus.open("w", encoding="utf-8", newline="\n") as f:
        for doc in world.documents:
            f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
    write_search_r1([_record(world, q) for q in world.train], paths.train)
    write_search_r1([_record(world, q) for q in world.test], paths.test)

    # Imported here: registering the command line must not load bm25s.
    from treegrpo.env.retrievers.bm25 import BM25Retriever

    retriever = BM25Retriever.from_corpus(paths.corpus, cache=False)
    episodes = _episodes(world, world.train, retriever, topk)
    # sft.parquet is a Search-R1 file of the train questions plus the episode columns.
    write_search_r1([_record(world, q) for q in world.train], paths.sft)
    table = pq.read_table(paths.sft)
    step_type = pa.list_(pa.struct([("action", pa.string()), ("observation", pa.string())]))
    extra = {
        "golds": pa.array([[q.answer] for q in world.train], pa.list_(pa.string())),
        "group_id": pa.array([q.index for q in world.train], pa.int64()),
        "steps": pa.array(
            [[{"action": a, "observation": o} for a, o in ep] for ep in episodes], step_type
        ),
        "response": pa.array(["".join(a + o for a, o in ep) for ep in episodes], pa.string()),
    }
    for name, column in extra.items():
        table = table.append_column(name, column)
    pq.write_table(table, paths.sft)
    return paths


# --- command line ---------------------------------------------------------------------------


def add_subcommand(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with its ``synth`` subcommand) on the main parser's subcommands;
    returns the ``data`` parser. Other ``data`` subcommands go on with `add_synth_command`'s
    pattern on ``data``'s own subparsers."""
    data = commands.add_parser("data", help="build datasets", description="Build datasets.")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    add_synth_command(data_commands)
    return data


def add_synth_command(data_commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synth`` on the subcommands of ``data``."""
    synth = data_commands.add_parser(
        "synth",
        help="write the synthetic multi-hop QA world (corpus, train/test, gold episodes)",
        description=(
            "Write a deterministic world of fictional entities: corpus.jsonl (wiki-18 format), "
            "train.parquet and test.parquet (Search-R1 format, data_source synth_{1..4}hop) and "
            "sft.parquet (a gold episode per train question). 4-hop questions need 4 searches: "
            "train and evaluate with max_turns >= 4."
        ),
    )
    synth.add_argument("--out", required=True, type=Path, help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--docs", type=int, default=2000, help="documents = entities (2000)")
    synth.add_argument("--train", type=int, default=1000, help="train questions (1000)")
    synth.add_argument("--test", type=int, default=200, help="test questions (200)")
    synth.set_defaults(run=_run)
    return synth


def _run(args: argparse.Namespace) -> int:
    if args.docs < _MIN_DOCS:
        raise InvalidArgumentError(
            f"--docs must be >= {_MIN_DOCS} (one entity each), got {args.docs}"
        )
    for flag in ("train", "test"):
        if getattr(args, flag) < 1:
            raise InvalidArgumentError(
                f"--{flag} must be >= 1 (each split is a file), got {getattr(args, flag)}"
            )
    if args.out.exists() and not args.out.is_dir():
        raise InvalidArgumentError(
            f"--out {args.out} is a file: pass a directory (it is created if missing)"
        )
    start = time.perf_counter()
    paths = synthesize(args.out, args.seed, n_docs=args.docs, n_train=args.train, n_test=args.test)
    seconds = time.perf_counter() - start
    for name in ("corpus", "train", "test", "sft"):
        print(f"{name:>7}: {getattr(paths, name)}")
    print(
        f"seed {args.seed}: {args.docs} documents, {args.train} train and {args.test} test "
        f"questions in {seconds:.1f} s (4-hop questions need max_turns >= 4)"
    )
    return 0
