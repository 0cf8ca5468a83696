"""Generate the bundled sample: a small, deterministic MS MARCO-format collection for both tasks, a byte-level BPE
tokenizer trained on it, and a tiny randomly initialised RoBERTa dual encoder.

    python -m sample_data --out data/sample --seed 13

The same seed gives byte-identical files (tokenizer and model weights included); all randomness comes from
``random.Random`` seeded by strings.  The files written: :func:`generate`; the relevance design (why the sample
can tell the training methods apart): :func:`make_corpus`.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from infra import cli_types as ct
from infra.io import InputError, PathLike, atomic_write_json, atomic_write_text, run_cli

DEFAULT_SEED = 13
DEFAULT_OUT = "data/sample"

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; "<mask>" gets the last id
MASK_TOKEN = "<mask>"
VOCAB_SIZE = 3000
MAX_QID = 1_200_000
MAX_TOKENS = 512  # longest stored sequence the sample needs (docs are cut there by preprocess)

# No dropout: trained from random initialisation, this 64-wide model with RoBERTa's 0.1 dropout collapses to one
# constant embedding (in-batch loss stuck at ln 2, dev MRR@10 ~ 0.003 after 3 epochs); without dropout the same run
# reaches MRR@10 ~ 0.6.  Dropout regularises fine-tuning of a pre-trained 768-wide model, not learning from scratch.
ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
RUN_DEPTH = 100                # documents per query in the BM25 train run (the official doc run's depth)
BM25_K1, BM25_B = 0.9, 0.4     # Anserini's defaults

# --- the sample's language ---------------------------------------------------------------------------------------
GLUE_WORDS = frozenset(
    "a about according also and are as at average by compared define definition different does every for from "
    "has have how in is it its known many measured most much of on other say than that the this to unlike under "
    "usual what which with year".split())
ONSETS = tuple("bcdfghklmnprstvwz") * 3 + ("bl", "br", "ch", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr",
                                           "sh", "sl", "sp", "st", "th", "tr")
VOWELS = tuple("aeiou") * 3 + ("ai", "ea", "ee", "oo", "ou")
CODAS = ("",) * 10 + ("n", "r", "l", "s", "m", "nd", "nt", "st")
NAME_ENDINGS = ("", "", "", "a", "on", "ia", "er", "ton", "wick", "more")
ATTRIBUTE_SUFFIXES = ("ity", "ness", "age", "ment", "ance", "ure", "ion", "ism")
ADJECTIVE_SUFFIXES = ("al", "ic", "ous", "ful", "ive", "y")
VERB_SUFFIXES = ("s", "es", "ed", "izes")
N_FAMILIES, FAMILY_SIZE, N_SYNONYMS = 16, 3, 3
SYNONYM_WEIGHTS = (0.6, 0.25, 0.15)  # how often texts use each synonym (queries draw uniformly)
JUDGED_PER_QUERY = (20, 60)  # judged items per test query (grade 0 included)
N_NOUNS, N_ADJECTIVES, N_VERBS, N_UNITS, N_SITES = 220, 80, 80, 24, 40

# --- sentence templates ({E} entity, {A} attribute word, {F} family word, {V} value, {O} other entity,
#     {N}/{N2}/{N3} nouns, {J}/{J2} adjectives, {VB} verb) ------------------------------------------------------
TOPIC_OPENERS = (
    "{E} has a {A} of about {V}.",
    "The {A} of {E} is {V}.",
    "The {F} {A} of {E} is around {V}, which {VB} most {N}.",
    "{E} is known for its {A}, measured at {V}.",
    "According to the {N}, the {A} of {E} {VB} {V}.",
    "What is the {A} of {E}? It is {V} on average.",
)
TOPIC_FOLLOWUPS = (
    "Its {A} {VB} the {J} {N} of the {N2}.",
    "This {F} {A} is {J} compared with other {N}.",
    "The {A} of {E} {VB} {J} {N} every year.",
    "Many {N} say the {A} of {E} is {V}.",
    "The usual {A} is {V}, and it {VB} the {N}.",
)
FILLER_SENTENCES = (
    "The {N} {VB} a {J} {N2} in the {N3}.",
    "Most {N} are {J} and {J2}.",
    "It {VB} the {N} with {J} {N2}.",
    "Every {N} {VB} {J} {N2} for the {N3}.",
    "A {J} {N} is {J2} under the {N2}.",
)
SECONDARY_SENTENCES = (
    "{E} is also known for its {A}, about {V}.",
    "The {A} of {E} is {V} as well.",
)
COMPARISON_SENTENCES = (
    "Unlike {O}, {E} {VB} a {J} {A}.",
    "Compared with {O}, the {A} of {E} is different.",
)
QUERY_TEMPLATES = (
    "what is the {A} of {E}",
    "{E} {A}",
    "{A} of {E}",
    "how much {A} does {E} have",
    "what is {E}'s {A}",
    "{E} {F} {A}",
    "average {A} of {E}",
    "define {A} of {E}",
)
TITLE_TEMPLATES = ("{Name}", "{Name} {A} - {Site}", "{A} of {Name} | {Site}", "What is the {A} of {Name}?")
URL_TEMPLATES = (
    "http://www.{site}.com/{slug}-{a}",
    "https://{site}.org/wiki/{Name_}",
    "http://{head}.{tld}/",
    "https://www.{site}.net/{noun}/{slug}.html",
)
TLDS = ("com", "org", "net", "info", "co.uk")


@dataclass(frozen=True)
class TaskSpec:
    """Sizes and text shape of one task's sample."""

    name: str
    items: int                      # passages or documents
    per_entity: tuple[int, int]     # items (distinct attributes) per entity, inclusive range
    words: tuple[int, int]          # text length in words (body for documents)
    duplicate_rate: float           # share of (entity, attribute) pairs that get a second item
    dev: int
    lead: int
    test_judged: int = 43
    test_unjudged: int = 17
    id_range: Optional[int] = None  # documents: docids are drawn from 1..id_range


PASSAGE = TaskSpec("passage", items=3000, per_entity=(10, 20), words=(12, 32), duplicate_rate=0.08,
                   dev=200, lead=100)
DOC = TaskSpec("doc", items=2000, per_entity=(10, 22), words=(100, 220), duplicate_rate=0.05,
               dev=200, lead=100, id_range=3_300_000)


@dataclass(frozen=True)
class Language:
    """The shared vocabulary: attributes (synonym sets, families, units) and filler words."""

    synonyms: tuple[tuple[str, ...], ...]  # attribute -> synonyms (index 0 = the usual word)
    family_of: tuple[int, ...]             # attribute -> family
    family_words: tuple[str, ...]
    units: tuple[str, ...]                 # attribute -> unit word
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]
    sites: tuple[str, ...]
    name_pool: tuple[str, ...]             # words entity names are made of (both tasks)

    @property
    def n_attributes(self) -> int:
        return len(self.synonyms)

    def siblings(self, attribute: int) -> list[int]:
        """Other attributes of the same family."""
        return [a for a in range(self.n_attributes)
                if a != attribute and self.family_of[a] == self.family_of[attribute]]


@dataclass(frozen=True)
class Corpus:
    """One task's items: ``topics[i] = (entity, attribute)`` of the item on line ``i``, and its text fields."""

    names: tuple[str, ...]                 # entity -> display name ("Kesta Morun")
    topics: tuple[tuple[int, int], ...]
    ids: tuple[int, ...]                   # official pid / docid of each line
    fields: tuple[tuple[str, ...], ...]    # (text,) for passages, (url, title, body) for documents


@dataclass(frozen=True)
class QuerySet:
    """Queries of one split: ``(qid, text, (entity, attribute))`` in file order."""

    queries: tuple[tuple[int, str, tuple[int, int]], ...]


class WordMaker:
    """Unique English-looking words built from syllables."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set(GLUE_WORDS)

    def make(self, syllables: tuple[int, int], suffixes: Sequence[str] = ("",)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            word = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                           for _ in range(n)) + self.rng.choice(suffixes)
            if 4 <= len(word) <= 14 and word not in self.used:
                self.used.add(word)
                return word

    def many(self, count: int, syllables: tuple[int, int], suffixes: Sequence[str] = ("",)) -> tuple[str, ...]:
        return tuple(self.make(syllables, suffixes) for _ in range(count))


def make_language(seed: int) -> Language:
    """Draw the shared vocabulary of the sample."""
    words = WordMaker(random.Random(f"sample-language-{seed}"))
    n_attributes = N_FAMILIES * FAMILY_SIZE
    synonyms = tuple(words.many(N_SYNONYMS, (1, 2), ATTRIBUTE_SUFFIXES) for _ in range(n_attributes))
    family_words = words.many(N_FAMILIES, (2, 2), ADJECTIVE_SUFFIXES)
    units = words.many(N_UNITS, (1, 2), ("s",))
    return Language(
        synonyms=synonyms,
        family_of=tuple(a // FAMILY_SIZE for a in range(n_attributes)),
        family_words=family_words,
        units=tuple(units[a % N_UNITS] for a in range(n_attributes)),
        nouns=words.many(N_NOUNS, (1, 2), ("", "", "s")),
        adjectives=words.many(N_ADJECTIVES, (1, 2), ADJECTIVE_SUFFIXES),
        verbs=words.many(N_VERBS, (1, 2), VERB_SUFFIXES),
        sites=words.many(N_SITES, (2, 2)),
        name_pool=words.many(500, (2, 2), NAME_ENDINGS),
    )


# --- item text -----------------------------------------------------------------------------------------------------
def _zipf_choice(rng: random.Random, words: Sequence[str]) -> str:
    """A word drawn with probability proportional to 1 / (rank + 1), so filler has frequent and rare words."""
    return rng.choices(words, cum_weights=_zipf_cum_weights(len(words)))[0]


_CUM_WEIGHTS: dict[int, list[float]] = {}


def _zipf_cum_weights(n: int) -> list[float]:
    if n not in _CUM_WEIGHTS:
        total, cum = 0.0, []
        for rank in range(n):
            total += 1.0 / (rank + 1)
            cum.append(total)
        _CUM_WEIGHTS[n] = cum
    return _CUM_WEIGHTS[n]


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _title_case(name: str) -> str:
    return " ".join(w.capitalize() for w in name.split())


class Writer:
    """Fills sentence templates for one task: its language, entity names and the value of each pair."""

    def __init__(self, rng: random.Random, lang: Language, names: Sequence[str]):
        self.rng, self.lang, self.names = rng, lang, names
        self._values: dict[tuple[int, int], int] = {}

    def value(self, entity: int, attribute: int) -> str:
        """The pair's value with its unit; duplicates of a pair state the same value."""
        key = (entity, attribute)
        if key not in self._values:
            self._values[key] = self.rng.randint(2, 980)
        return f"{self._values[key]} {self.lang.units[attribute]}"

    def text_synonym(self, attribute: int) -> str:
        return self.rng.choices(self.lang.synonyms[attribute], weights=SYNONYM_WEIGHTS)[0]

    def fill(self, template: str, entity: int, attribute: int, surface: Optional[str] = None,
             other: Optional[int] = None) -> str:
        rng, lang = self.rng, self.lang
        slots = {
            "E": surface or _title_case(self.names[entity]), "A": self.text_synonym(attribute),
            "F": lang.family_words[lang.family_of[attribute]], "V": self.value(entity, attribute),
            "O": _title_case(self.names[other]) if other is not None else "",
            **{key: _zipf_choice(rng, lang.nouns) for key in ("N", "N2", "N3")},
            **{key: _zipf_choice(rng, lang.adjectives) for key in ("J", "J2")},
            "VB": _zipf_choice(rng, lang.verbs),
        }
        return _capitalize(template.format(**slots))

    def short_surface(self, entity: int) -> str:
        """How a follow-up sentence refers to the entity: the full name or its first word."""
        name = _title_case(self.names[entity])
        return name if self.rng.random() < 0.5 else name.split()[0]

    def sentences(self, entity: int, attribute: int, others: Sequence[int], n_words: int,
                  mix: Sequence[tuple[str, float]]) -> list[str]:
        """An opening topic sentence, then sentences of the kinds in ``mix`` until ``n_words`` words.

        Kinds: "topic" (the pair again), "filler", "secondary" (another attribute of the entity, from ``others``),
        "comparison" (the attribute of another entity).
        """
        rng = self.rng
        out = [self.fill(rng.choice(TOPIC_OPENERS), entity, attribute)]
        count = len(out[0].split())
        kinds, weights = zip(*mix)
        while count < n_words:
            kind = rng.choices(kinds, weights=weights)[0]
            if kind == "topic":
                s = self.fill(rng.choice(TOPIC_FOLLOWUPS), entity, attribute, self.short_surface(entity))
            elif kind == "secondary" and others:
                s = self.fill(rng.choice(SECONDARY_SENTENCES), entity, rng.choice(others),
                              self.short_surface(entity))
            elif kind == "comparison":
                other = rng.randrange(len(self.names))
                if other == entity:
                    continue
                s = self.fill(rng.choice(COMPARISON_SENTENCES), entity, attribute, self.short_surface(entity), other)
            else:
                s = self.fill(rng.choice(FILLER_SENTENCES), entity, attribute)
            out.append(s)
            count += len(s.split())
        return out

    def passage(self, entity: int, attribute: int, others: Sequence[int], spec: TaskSpec) -> tuple[str]:
        mix = (("topic", 0.5), ("filler", 0.35), ("secondary", 0.1), ("comparison", 0.05))
        return (" ".join(self.sentences(entity, attribute, others, self.rng.randint(*spec.words), mix)),)

    def document(self, entity: int, attribute: int, others: Sequence[int], spec: TaskSpec) -> tuple[str, str, str]:
        rng, lang = self.rng, self.lang
        mix = (("topic", 0.35), ("filler", 0.35), ("secondary", 0.22), ("comparison", 0.08))
        body = " ".join(self.sentences(entity, attribute, others, rng.randint(*spec.words), mix))
        name = _title_case(self.names[entity])
        synonym = self.text_synonym(attribute)
        site = rng.choice(lang.sites)
        title = "" if rng.random() < 0.015 else rng.choice(TITLE_TEMPLATES).format(
            Name=name, A=synonym, Site=site.capitalize())
        url = rng.choice(URL_TEMPLATES).format(
            site=site, slug=name.lower().replace(" ", "-"), a=synonym, Name_=name.replace(" ", "_"),
            head=name.split()[0].lower(), tld=rng.choice(TLDS), noun=rng.choice(lang.nouns))
        return url, title, body

    def query(self, entity: int, attribute: int, avoid: str = "") -> str:
        """A real-looking query (lower case, a synonym drawn uniformly, sometimes a partial name or a quirk) that
        differs from ``avoid``."""
        text = avoid
        while text.strip(" ?").lower() == avoid.strip(" ?").lower():
            text = self._query(entity, attribute)
        return text

    def _query(self, entity: int, attribute: int) -> str:
        rng, lang = self.rng, self.lang
        name = self.names[entity]
        surface = name.split()[0] if " " in name and rng.random() < 0.15 else name
        text = rng.choice(QUERY_TEMPLATES).format(
            E=surface, A=rng.choice(lang.synonyms[attribute]), F=lang.family_words[lang.family_of[attribute]])
        roll = rng.random()
        if roll < 0.01:
            text = " " + text  # as in the real dev file ("2\t Androgen receptor define")
        elif roll < 0.06:
            text = _capitalize(text)
        elif roll < 0.16:
            text += "?"
        return text


# --- corpora and queries -------------------------------------------------------------------------------------------
def make_entities(rng: random.Random, lang: Language, used_names: set[str], count: int) -> tuple[str, ...]:
    """``count`` unique one- or two-word names from the shared name pool (a name word may recur across names)."""
    names: list[str] = []
    while len(names) < count:
        first = rng.choice(lang.name_pool)
        name = first if rng.random() < 0.55 else f"{first} {rng.choice(lang.name_pool)}"
        if name not in used_names and len(set(name.split())) == len(name.split()):
            used_names.add(name)
            names.append(name)
    return tuple(names)


def plan_topics(rng: random.Random, lang: Language, spec: TaskSpec) -> tuple[int, list[tuple[int, int]]]:
    """(number of entities, topics in line order): each entity gets distinct attributes, some pairs twice."""
    topics: list[tuple[int, int]] = []
    entity = 0
    while len(topics) < spec.items:
        attributes = rng.sample(range(lang.n_attributes), rng.randint(*spec.per_entity))
        for attribute in attributes:
            topics.append((entity, attribute))
            if rng.random() < spec.duplicate_rate:
                topics.append((entity, attribute))
        entity += 1
    topics = topics[:spec.items]
    rng.shuffle(topics)
    return entity, topics


def make_corpus(rng: random.Random, lang: Language, spec: TaskSpec, used_names: set[str]) -> tuple[Corpus, Writer]:
    """Draw one task's entities, topics, ids and texts.

    Relevance design (why the sample can tell the training methods apart)
    ---------------------------------------------------------------------
    The text is made of synthetic, English-looking words glued by real English function words.  A shared "language"
    has attributes (concepts), each with a set of synonyms, grouped in families of three sibling attributes that
    share a family word.  Each task has its own entities (one- or two-word names, name words may be shared).

    * Every passage/document is about one (entity, attribute) pair: it names the entity, states the attribute
      with one of its synonyms (the first synonym is the usual one) and a value, and adds filler sentences; some
      mention a second attribute of the same entity or compare with another entity.  A document adds a url and a
      title and mixes sentences about the dominant attribute with sentences about other attributes.
    * Each entity has several items with different attributes, and some pairs have two items (several positives).
    * A query names an entity and an attribute, drawn uniformly from the synonym set, so it often uses a word the
      relevant text does not contain.  Its positives are the items about that pair.
    * Random negatives almost always name another entity, so in-batch negatives teach entity matching only.  The
      items about the same entity with another attribute are the hard negatives: ranking them below the positive
      needs the attribute, which static (STAR) and dynamic (ADORE) hard negatives teach.
    * TREC-style test grades (:func:`graded_qrels`): 3 = the exact pair, 2 = another item of the entity that states
      the attribute in passing, 1 = same entity and a sibling attribute, 0 = judged non-relevant (the entity's other
      items, the attribute for other entities, random items).  As in TREC DL, the lexically close items that do not
      answer the query are judged 0, so NDCG@10 rewards telling the attribute apart, not only the entity.

    Every pair has one train query; dev, test and eval queries reword distinct pairs (see :func:`split_queries`).
    """
    n_entities, topics = plan_topics(rng, lang, spec)
    names = make_entities(rng, lang, used_names, n_entities)
    writer = Writer(rng, lang, names)
    attributes_of: dict[int, list[int]] = defaultdict(list)
    for entity, attribute in topics:
        if attribute not in attributes_of[entity]:
            attributes_of[entity].append(attribute)
    make_item = writer.document if spec.id_range else writer.passage
    fields = tuple(make_item(e, a, [b for b in attributes_of[e] if b != a], spec) for e, a in topics)
    ids = tuple(rng.sample(range(1, spec.id_range), len(topics))) if spec.id_range else tuple(range(len(topics)))
    return Corpus(names=names, topics=tuple(topics), ids=ids, fields=fields), writer


def split_queries(rng: random.Random, corpus: Corpus, writer: Writer, spec: TaskSpec) -> dict[str, QuerySet]:
    """One train query per (entity, attribute) pair, and dev, test (judged first) and lead queries on distinct pairs.

    Every item is thus a training positive, and an evaluation query is a new wording (never the same text) of a
    pair seen in training.  Were evaluation pairs left out of training, their items would only ever be seen as
    same-entity hard negatives, and a small model trained with hard negatives learns to push exactly those items
    down.  qids are unique and random.
    """
    pairs = list(dict.fromkeys(corpus.topics))
    rng.shuffle(pairs)
    sizes = {"dev": spec.dev, "test": spec.test_judged + spec.test_unjudged, "lead": spec.lead}
    if sum(sizes.values()) > len(pairs):
        raise ValueError(f"{spec.name}: {len(pairs)} pairs cannot hold {sum(sizes.values())} evaluation queries")
    qids = iter(rng.sample(range(1, MAX_QID), len(pairs) + sum(sizes.values())))
    train = [(next(qids), writer.query(*pair), pair) for pair in pairs]
    rng.shuffle(train)
    train_text = {pair: text for _, text, pair in train}
    splits, start = {"train": QuerySet(tuple(train))}, 0
    for split, size in sizes.items():
        chosen = pairs[start:start + size]
        start += size
        splits[split] = QuerySet(tuple((next(qids), writer.query(*pair, avoid=train_text[pair]), pair)
                                       for pair in chosen))
    return splits


def relevant_items(corpus: Corpus) -> dict[tuple[int, int], list[int]]:
    """(entity, attribute) -> line numbers of its items."""
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for line, pair in enumerate(corpus.topics):
        by_pair[pair].append(line)
    return by_pair


def binary_qrels(corpus: Corpus, queries: QuerySet) -> list[tuple[int, int]]:
    """(qid, official item id) of every item about the query's pair."""
    by_pair = relevant_items(corpus)
    return [(qid, corpus.ids[line]) for qid, _, pair in queries.queries for line in by_pair[pair]]


def graded_qrels(rng: random.Random, lang: Language, corpus: Corpus, queries: Sequence[tuple[int, str, tuple[int, int]]]
                 ) -> list[tuple[int, int, int]]:
    """(qid, item id, grade) judgments on the TREC DL scale, by what an item says about the query's pair:

    * 3 (perfectly relevant): the item is about the exact (entity, attribute) pair;
    * 2 (highly relevant): another item of the entity that states the queried attribute in a secondary sentence
      (one of the attribute's synonyms occurs in its text);
    * 1 (related): another item of the entity about a sibling attribute (same family word);
    * 0 (judged non-relevant): every other item of the entity (the lexically close hard negatives), 4-12 items
      about the attribute for other entities, and random items up to 20-60 judgments.
    """
    lines_of_entity: dict[int, list[int]] = defaultdict(list)
    lines_of_attribute: dict[int, list[int]] = defaultdict(list)
    for line, (entity, attribute) in enumerate(corpus.topics):
        lines_of_entity[entity].append(line)
        lines_of_attribute[attribute].append(line)
    judged: list[tuple[int, int, int]] = []
    for qid, _, (entity, attribute) in queries:
        synonyms, siblings = set(lang.synonyms[attribute]), set(lang.siblings(attribute))

        def grade(line: int) -> int:
            about = corpus.topics[line][1]
            if about == attribute:
                return 3
            if synonyms & set(_terms(" ".join(corpus.fields[line]))):
                return 2
            return 1 if about in siblings else 0

        grades = {line: grade(line) for line in lines_of_entity[entity]}
        same_attribute = [line for line in lines_of_attribute[attribute] if line not in grades]
        negatives = rng.sample(same_attribute, min(len(same_attribute), rng.randint(4, 12)))
        low, high = JUDGED_PER_QUERY
        n_judged = rng.randint(min(high, max(low, 2 * len(grades) + 4)), high)  # most judgments are grade 0
        while len(grades) + len(negatives) < n_judged:
            line = rng.randrange(len(corpus.topics))
            if line not in grades and line not in negatives:
                negatives.append(line)
        grades.update((line, 0) for line in negatives)
        judged.extend((qid, corpus.ids[line], g) for line, g in grades.items())
    return judged


# --- file writers --------------------------------------------------------------------------------------------------
def _lines(rows: Iterable[Sequence[object]], sep: str) -> str:
    return "".join(sep.join(str(x) for x in row) + "\n" for row in rows)


def _query_file(queries: QuerySet) -> str:
    return _lines(((qid, text) for qid, text, _ in queries.queries), "\t")


def _binary_qrels_file(corpus: Corpus, queries: QuerySet, sep: str, prefix: str, by_item: bool) -> str:
    """``qid 0 id 1`` lines, sorted by item id (the real passage files are nearly so) or by qid (doc files)."""
    rows = sorted(binary_qrels(corpus, queries), key=(lambda r: (r[1], r[0])) if by_item else None)
    return _lines(((qid, 0, f"{prefix}{item}", 1) for qid, item in rows), sep)


def _trec_qrels(rows: list[tuple[int, int, int]], prefix: str) -> str:
    """``qid Q0 id grade`` sorted like the NIST files: qid numerically, then id as a string."""
    rows = sorted(rows, key=lambda r: (r[0], f"{prefix}{r[1]}"))
    return _lines(((qid, "Q0", f"{prefix}{item}", grade) for qid, item, grade in rows), " ")


def task_files(rng: random.Random, lang: Language, corpus: Corpus, splits: dict[str, QuerySet],
               spec: TaskSpec) -> dict[str, str]:
    """File name -> content of one task's ``dataset`` folder."""
    judged = splits["test"].queries[:spec.test_judged]
    test = list(splits["test"].queries)
    rng.shuffle(test)  # judged and unjudged test queries interleaved, as in the real file
    trec = graded_qrels(rng, lang, corpus, judged)
    if spec.id_range is None:
        return {
            "collection.tsv": _lines(((pid, text) for pid, (text,) in zip(corpus.ids, corpus.fields)), "\t"),
            "queries.train.tsv": _query_file(splits["train"]),
            "queries.dev.small.tsv": _query_file(splits["dev"]),
            "queries.eval.small.tsv": _query_file(splits["lead"]),
            "qrels.train.tsv": _binary_qrels_file(corpus, splits["train"], "\t", "", by_item=True),
            "qrels.dev.small.tsv": _binary_qrels_file(corpus, splits["dev"], "\t", "", by_item=True),
            "msmarco-test2019-queries.tsv": _query_file(QuerySet(tuple(test))),
            "2019qrels-pass.txt": _trec_qrels(trec, ""),
        }
    return {
        "msmarco-docs.tsv": _lines(((f"D{d}", *f) for d, f in zip(corpus.ids, corpus.fields)), "\t"),
        "msmarco-doctrain-queries.tsv": _query_file(splits["train"]),
        "msmarco-doctrain-qrels.tsv": _binary_qrels_file(corpus, splits["train"], " ", "D", by_item=False),
        "msmarco-docdev-queries.tsv": _query_file(splits["dev"]),
        "msmarco-docdev-qrels.tsv": _binary_qrels_file(corpus, splits["dev"], "\t", "D", by_item=False),
        "msmarco-test2019-queries.tsv": _query_file(QuerySet(tuple(test))),
        "2019qrels-docs.txt": _trec_qrels(trec, "D"),
        "docleaderboard-queries.tsv": _query_file(splits["lead"]),
        "msmarco-doctrain-top100": bm25_run(corpus, splits["train"]),
    }


def _terms(text: str) -> list[str]:
    """Lower-cased words and numbers of ``text``, the glue words dropped as stop words."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in GLUE_WORDS]


def bm25_run(corpus: Corpus, queries: QuerySet, depth: int = RUN_DEPTH, tag: str = "BM25") -> str:
    """A TREC run ``qid Q0 D<docid> rank score tag`` of the top-``depth`` documents of each query, in query file
    order, as the official ``msmarco-doctrain-top100``: the external ranking the doc warm-up takes its negatives
    from (DRhard issue #18).  Scores are BM25 (k1 0.9, b 0.4) over the words of url, title and body::

        score(q, d) = Σ_{w in q} idf(w) · tf(w, d) · (k1 + 1) / (tf(w, d) + k1 · (1 − b + b · |d| / avgdl))
        idf(w) = ln(1 + (N − df(w) + 0.5) / (df(w) + 0.5))

    Ties are broken by line order; a query gets fewer than ``depth`` lines when fewer documents share a word.
    """
    postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
    lengths = []
    for line, fields in enumerate(corpus.fields):
        words = _terms(" ".join(fields))
        lengths.append(len(words))
        for word, tf in Counter(words).items():
            postings[word].append((line, tf))
    n, avg = len(lengths), sum(lengths) / len(lengths)
    rows = []
    for qid, text, _ in queries.queries:
        scores: dict[int, float] = defaultdict(float)
        for word in set(_terms(text)):
            plist = postings.get(word, [])
            idf = math.log(1 + (n - len(plist) + 0.5) / (len(plist) + 0.5))
            for line, tf in plist:
                scores[line] += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * lengths[line] / avg))
        top = sorted(scores, key=lambda line: (-scores[line], line))[:depth]
        rows += [(qid, "Q0", f"D{corpus.ids[line]}", rank, f"{scores[line]:.4f}", tag)
                 for rank, line in enumerate(top, 1)]
    return _lines(rows, " ")


def model_texts(corpus: Corpus, splits: dict[str, QuerySet]) -> list[str]:
    """The texts as preprocess feeds them to the tokenizer (doc: ``url<sep>title<sep>body``), lower-cased."""
    texts = ["<sep>".join(f.rstrip() for f in fields).lower() for fields in corpus.fields]
    texts += [text.lower() for split in splits.values() for _, text, _ in split.queries]
    return texts


# --- tokenizer and initial model -----------------------------------------------------------------------------------
def train_bpe(texts: Sequence[str], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE trained on ``texts`` (each with the prefix space preprocess adds).

    Returns the vocabulary in id order (``<s> <pad> </s> <unk>``, the 256 byte symbols, the merged tokens,
    ``<mask>`` last) and the merges in rank order.  The trainer breaks count ties by pair ids, so it is
    deterministic (checked by the tests across processes).
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    state = json.loads(bpe.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    if [t for t, _ in vocab[:len(SPECIAL_TOKENS)]] != list(SPECIAL_TOKENS) or vocab[-1][1] != len(vocab) - 1:
        raise RuntimeError("unexpected BPE vocabulary layout")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return [t for t, _ in vocab] + [MASK_TOKEN], merges


def tokenizer_files(vocab: Sequence[str], merges: Sequence[tuple[str, str]], model_max_length: int) -> dict[str, str]:
    """An HF RoBERTa tokenizer folder (the files of ``roberta-base``): vocab, merges, config, special tokens."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
               "pad_token": "<pad>", "cls_token": "<s>",
               "mask_token": {"content": MASK_TOKEN, "lstrip": True, "normalized": False, "rstrip": False,
                              "single_word": False}}
    config = {"tokenizer_class": "RobertaTokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "errors": "replace", **special}
    return {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def longest_encoding(vocab: Sequence[str], merges: Sequence[tuple[str, str]], texts: Sequence[str]) -> int:
    """Most tokens of any text, ``<s>`` and ``</s>`` included (prefix space as preprocess adds it)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer({tok: i for i, tok in enumerate(vocab)}, list(merges), add_prefix_space=True)
    return 2 + max(len(e.ids) for e in bpe.encode_batch(list(texts)))


def encoder_config(vocab_size: int, max_position_embeddings: int):
    """The tiny RoBERTa of the sample (hidden 64, 2 layers, 2 heads, no dropout: see ``ENCODER``)."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                         type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         layer_norm_eps=1e-5, architectures=["RobertaModel"], **ENCODER)


def write_init_model(folder: Path, config, seed: int) -> None:
    """Random initial weights from ``config`` with a fixed torch seed (the caller's RNG state is kept)."""
    import torch

    from model import DenseEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DenseEncoder.from_config(config)
    model.save_pretrained(folder)


def _write_all(folder: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        atomic_write_text(folder / name, content)


# --- driver --------------------------------------------------------------------------------------------------------
def generate(out: PathLike, seed: int = DEFAULT_SEED, with_model: bool = True) -> dict[str, int]:
    """Write the whole sample under ``out``; returns the summary numbers (also in ``out/sample_info.json``).

    Layout written under ``--out`` (file formats are those of the real MS MARCO / TREC DL 2019 files, LF line ends)::

        passage/dataset/collection.tsv           pid \\t text                      (pids 0..N-1 in line order)
        passage/dataset/queries.{train,dev.small,eval.small}.tsv, msmarco-test2019-queries.tsv    qid \\t text
        passage/dataset/qrels.{train,dev.small}.tsv    qid \\t 0 \\t pid \\t 1          (tab-separated, sorted by pid)
        passage/dataset/2019qrels-pass.txt       qid Q0 pid grade                 (space-separated, grades 0-3)
        doc/dataset/msmarco-docs.tsv             D<docid> \\t url \\t title \\t body  (docids random, not in line order)
        doc/dataset/msmarco-doc{train,dev}-queries.tsv, msmarco-test2019-queries.tsv, docleaderboard-queries.tsv
        doc/dataset/msmarco-doctrain-qrels.tsv   qid 0 D<docid> 1                 (space-separated)
        doc/dataset/msmarco-docdev-qrels.tsv     qid \\t 0 \\t D<docid> \\t 1        (tab-separated, as the real copy)
        doc/dataset/2019qrels-docs.txt           qid Q0 D<docid> grade
        doc/dataset/msmarco-doctrain-top100      qid Q0 D<docid> rank score tag   (BM25 top-100 train run, TREC format)
        tokenizer/                               vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
        init_model/                              the tokenizer files + config.json + model.safetensors (model.py)

    As in the real data, the test query file holds more queries than are judged (preprocess keeps only the judged
    ones), the TREC qrels are sorted by qid and then by the id as a string, and the doc title may be empty.
    """
    out = Path(out)
    lang = make_language(seed)
    used_names: set[str] = set()
    texts: list[str] = []
    info: dict[str, int] = {"seed": seed}
    for spec in (PASSAGE, DOC):
        rng = random.Random(f"sample-{spec.name}-{seed}")
        corpus, writer = make_corpus(rng, lang, spec, used_names)
        splits = split_queries(rng, corpus, writer, spec)
        _write_all(out / spec.name / "dataset", task_files(rng, lang, corpus, splits, spec))
        task_texts = model_texts(corpus, splits)
        texts += task_texts
        info[f"{spec.name}_items"] = len(corpus.topics)
        info[f"{spec.name}_entities"] = len(corpus.names)
    vocab, merges = train_bpe(texts, VOCAB_SIZE)
    longest = longest_encoding(vocab, merges, texts)
    max_positions = min(MAX_TOKENS, _round_up(longest, 64)) + 2
    tok_files = tokenizer_files(vocab, merges, max_positions - 2)
    _write_all(out / "tokenizer", tok_files)
    _write_all(out / "init_model", tok_files)
    info.update(vocab_size=len(vocab), longest_tokens=longest, max_position_embeddings=max_positions)
    config = encoder_config(len(vocab), max_positions)
    if with_model:
        write_init_model(out / "init_model", config, seed)
    else:
        atomic_write_text(out / "init_model" / "config.json", config.to_json_string(use_diff=False))
    atomic_write_json(out / "sample_info.json", info)
    return info


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def describe(out: PathLike) -> str:
    """A table of every file under ``out``: lines and bytes."""
    out = Path(out)
    rows = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rows.append((str(path.relative_to(out)), data.count(b"\n"), len(data)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {lines:>7} lines  {size:>9} bytes" for name, lines, size in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sample_data",
        description="Write the bundled sample: MS MARCO-format passage and doc data, a BPE tokenizer trained on "
                    "it and a tiny random RoBERTa encoder (deterministic for a given seed).")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=ct.seed, default=DEFAULT_SEED, help="generator seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")
    parser.add_argument("--no_model", action="store_true",
                        help="write init_model/config.json and the tokenizer but no weights")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError("output folder is not empty; pass --overwrite to replace the sample", path=out)
    generate(out, args.seed, with_model=not args.no_model)
    print(describe(out))


if __name__ == "__main__":
    run_cli(main)
