"""Tests of the bundled sample generator: determinism, MS MARCO formats, the tokenizer/model folders, and that
relevance is lexically learnable with same-entity hard negatives."""
import math
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import sample_data
from infra.io import InputError

PASSAGE_FILES = ("collection.tsv", "queries.train.tsv", "queries.dev.small.tsv", "queries.eval.small.tsv",
                 "qrels.train.tsv", "qrels.dev.small.tsv", "msmarco-test2019-queries.tsv", "2019qrels-pass.txt")
DOC_FILES = ("msmarco-docs.tsv", "msmarco-doctrain-queries.tsv", "msmarco-doctrain-qrels.tsv",
             "msmarco-docdev-queries.tsv", "msmarco-docdev-qrels.tsv", "msmarco-test2019-queries.tsv",
             "2019qrels-docs.txt", "docleaderboard-queries.tsv", "msmarco-doctrain-top100")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    sample_data.generate(out, seed=13)
    return out


def _cli(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "sample_data", "--out", str(out), *args], check=True,
                   capture_output=True, cwd=Path(sample_data.__file__).parent)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path, sep: str) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text, path
    return [line.split(sep) for line in text.split("\n")[:-1]]


def _queries(path: Path) -> dict[int, str]:
    rows = _rows(path, "\t")
    assert all(len(r) == 2 and r[0].isdigit() and r[1].strip() for r in rows), path
    qids = [int(r[0]) for r in rows]
    assert len(set(qids)) == len(qids), path
    return dict(zip(qids, (r[1] for r in rows)))


def _binary_qrels(path: Path, sep: str, prefix: str) -> dict[int, set[int]]:
    qrels: dict[int, set[int]] = defaultdict(set)
    for row in _rows(path, sep):
        assert len(row) == 4 and row[1] == "0" and row[3] == "1", row
        assert row[2].startswith(prefix) and row[2][len(prefix):].isdigit(), row
        qrels[int(row[0])].add(int(row[2][len(prefix):]))
    return qrels


def _trec_qrels(path: Path, prefix: str) -> dict[int, dict[int, int]]:
    rows = _rows(path, " ")
    assert all(len(r) == 4 and r[1] == "Q0" and r[3] in "0123" for r in rows)
    assert rows == sorted(rows, key=lambda r: (int(r[0]), r[2])), "not sorted like the NIST files"
    graded: dict[int, dict[int, int]] = defaultdict(dict)
    for qid, _, item, grade in rows:
        assert item.startswith(prefix)
        graded[int(qid)][int(item[len(prefix):])] = int(grade)
    return graded


# --- determinism and CLI -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_is_byte_identical_across_processes(sample, tmp_path):
    _cli(tmp_path / "again", "--seed", "13")
    first, second = _all_bytes(sample), _all_bytes(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert "init_model/model.safetensors" in first and "tokenizer/merges.txt" in first
    assert [name for name in first if first[name] != second[name]] == []


@pytest.mark.slow
def test_other_seed_gives_other_data(sample, tmp_path):
    _cli(tmp_path / "other", "--seed", "14", "--no_model")
    other = tmp_path / "other"
    for name in ("passage/dataset/collection.tsv", "doc/dataset/msmarco-docs.tsv", "tokenizer/merges.txt"):
        assert (sample / name).read_bytes() != (other / name).read_bytes(), name
    assert not (other / "init_model" / "model.safetensors").exists()
    assert (other / "init_model" / "config.json").is_file()


def test_refuses_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        sample_data.main(["--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "x"


# --- formats -------------------------------------------------------------------------------------------------------
def test_passage_files_follow_msmarco_formats(sample):
    d = sample / "passage" / "dataset"
    assert sorted(p.name for p in d.iterdir()) == sorted(PASSAGE_FILES)
    collection = _rows(d / "collection.tsv", "\t")
    assert all(len(r) == 2 and r[1] and r[1] == r[1].strip() for r in collection)
    assert [int(r[0]) for r in collection] == list(range(len(collection)))  # pid == line offset
    assert 3000 <= len(collection) <= 5000
    assert 15 <= sum(len(r[1].split()) for r in collection) / len(collection) <= 60
    splits = {name: _queries(d / f) for name, f in (("train", "queries.train.tsv"), ("dev", "queries.dev.small.tsv"),
                                                     ("lead", "queries.eval.small.tsv"),
                                                     ("test", "msmarco-test2019-queries.tsv"))}
    all_qids = [q for queries in splits.values() for q in queries]
    assert len(all_qids) == len(set(all_qids))  # splits are disjoint
    for split, qrels_file in (("train", "qrels.train.tsv"), ("dev", "qrels.dev.small.tsv")):
        qrels = _binary_qrels(d / qrels_file, "\t", "")
        assert set(qrels) == set(splits[split])
        assert all(pid < len(collection) for pids in qrels.values() for pid in pids)
    train_qrels = _binary_qrels(d / "qrels.train.tsv", "\t", "")
    assert 0 < sum(len(p) > 1 for p in train_qrels.values()) < 0.2 * len(train_qrels)  # some have 2 positives
    assert 1500 <= len(splits["train"]) <= 3000 and len(splits["dev"]) >= 150 and len(splits["lead"]) >= 50
    graded = _trec_qrels(d / "2019qrels-pass.txt", "")
    assert len(graded) == 43 and set(graded) < set(splits["test"])  # more test queries than judged, as DL19
    _check_graded(graded, len(collection))


def test_doc_files_follow_msmarco_formats(sample):
    d = sample / "doc" / "dataset"
    assert sorted(p.name for p in d.iterdir()) == sorted(DOC_FILES)
    docs = _rows(d / "msmarco-docs.tsv", "\t")
    assert all(len(r) == 4 and re.fullmatch(r"D[1-9][0-9]*", r[0]) and r[1].startswith("http") and r[3]
               for r in docs)
    docids = [int(r[0][1:]) for r in docs]
    assert len(set(docids)) == len(docids) and docids != sorted(docids)  # offsets unrelated to docids
    assert any(r[2] == "" for r in docs)  # a few empty titles, as in the real collection
    assert 80 <= sum(len(r[3].split()) for r in docs) / len(docs) <= 300
    known = set(docids)
    qids: list[int] = []
    for queries_file, qrels_file, sep in (("msmarco-doctrain-queries.tsv", "msmarco-doctrain-qrels.tsv", " "),
                                          ("msmarco-docdev-queries.tsv", "msmarco-docdev-qrels.tsv", "\t")):
        queries = _queries(d / queries_file)
        qrels = _binary_qrels(d / qrels_file, sep, "D")
        assert set(qrels) == set(queries) and all(ids <= known for ids in qrels.values())
        assert list(qrels) == sorted(qrels)  # doc qrels are sorted by qid
        qids += list(queries)
    test, lead = _queries(d / "msmarco-test2019-queries.tsv"), _queries(d / "docleaderboard-queries.tsv")
    qids += list(test) + list(lead)
    assert len(qids) == len(set(qids))
    graded = _trec_qrels(d / "2019qrels-docs.txt", "D")
    assert len(graded) == 43 and set(graded) < set(test)
    _check_graded(graded, None, known)


def _check_graded(graded: dict[int, dict[int, int]], n_items, known=None) -> None:
    for judgments in graded.values():
        assert 20 <= len(judgments) <= 60
        assert all(item < n_items if known is None else item in known for item in judgments)
        assert 3 in judgments.values() and 0 in judgments.values()
    grades = Counter(g for judgments in graded.values() for g in judgments.values())
    assert grades[0] > 10 * grades[3] and min(grades[g] for g in (1, 2, 3)) > 0  # most judged items are grade 0


# --- tokenizer and initial model -----------------------------------------------------------------------------------
def test_tokenizer_folder_loads_offline_and_round_trips(sample):
    from transformers import AutoTokenizer

    collection = _rows(sample / "passage" / "dataset" / "collection.tsv", "\t")
    texts = [r[1].lower() for r in collection[:50]] + ["what is the price of a tardis?", "<sep> héllo 123"]
    for folder in ("tokenizer", "init_model"):
        assert all((sample / folder / f).is_file() for f in TOKENIZER_FILES)
        tok = AutoTokenizer.from_pretrained(str(sample / folder))
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.mask_token_id == len(tok) - 1 and 2000 <= len(tok) <= 4000
        for text in texts:
            ids = tok(" " + text)["input_ids"]
            assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
            assert tok.decode(ids, skip_special_tokens=True) == " " + text
        # BPE learned the corpus: a passage takes far fewer tokens than bytes
        assert sum(len(tok(" " + t)["input_ids"]) for t in texts[:50]) < 0.35 * sum(len(t) for t in texts[:50])


def test_init_model_matches_tokenizer_and_encodes(sample):
    import torch
    from transformers import AutoTokenizer

    from model import DenseEncoder

    folder = sample / "init_model"
    model = DenseEncoder.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    config = model.config
    assert (config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id) == (len(tok), 1, 0, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert tok.model_max_length == config.max_position_embeddings - 2
    docs = _rows(sample / "doc" / "dataset" / "msmarco-docs.tsv", "\t")
    longest = max(len(tok(" " + "<sep>".join(r[1:]).lower())["input_ids"]) for r in docs)
    assert longest <= config.max_position_embeddings - 2  # every text fits without truncation
    batch = tok([" what is it", " " + docs[0][3].lower()], padding=True, return_tensors="pt")
    with torch.inference_mode():
        emb = model(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 64) and torch.isfinite(emb).all() and emb.std() > 0


# --- relevance is learnable, hard negatives exist --------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _bm25_top(docs: list[str], queries: list[str], k: int = 10, k1: float = 0.9, b: float = 0.4) -> list[list[int]]:
    """Top-k doc indices of each query by BM25 (computed here, independently of the generator)."""
    postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
    lengths = []
    for i, doc in enumerate(docs):
        words = _words(doc)
        lengths.append(len(words))
        for word, tf in Counter(words).items():
            postings[word].append((i, tf))
    avg = sum(lengths) / len(lengths)
    tops = []
    for query in queries:
        scores: dict[int, float] = defaultdict(float)
        for word in set(_words(query)):
            plist = postings.get(word, [])
            idf = math.log(1 + (len(docs) - len(plist) + 0.5) / (len(plist) + 0.5))
            for i, tf in plist:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / avg))
        tops.append(sorted(scores, key=lambda i: (-scores[i], i))[:k])
    return tops


def _name_words(texts: list[str]) -> set[str]:
    """Words written capitalised inside a sentence: the entity names of the sample."""
    found = set()
    for text in texts:
        found.update(w.lower() for w in re.findall(r"(?<=[a-z,] )[A-Z][a-z]+", text))
    return found


@pytest.mark.parametrize("task", ["passage", "doc"])
def test_lexical_ranking_is_informative_and_hard_negatives_share_the_entity(sample, task):
    d = sample / task / "dataset"
    if task == "passage":
        rows = _rows(d / "collection.tsv", "\t")
        ids, texts = [int(r[0]) for r in rows], [r[1] for r in rows]
        queries, qrels = _queries(d / "queries.dev.small.tsv"), _binary_qrels(d / "qrels.dev.small.tsv", "\t", "")
    else:
        rows = _rows(d / "msmarco-docs.tsv", "\t")
        ids, texts = [int(r[0][1:]) for r in rows], [" ".join(r[1:]) for r in rows]
        queries = _queries(d / "msmarco-docdev-queries.tsv")
        qrels = _binary_qrels(d / "msmarco-docdev-qrels.tsv", "\t", "D")
    names = _name_words(texts)
    qids = list(queries)
    tops = _bm25_top(texts, [queries[q] for q in qids])
    mrr, shares_entity = 0.0, 0
    for qid, top in zip(qids, tops):
        relevant = qrels[qid]
        ranks = [r for r, i in enumerate(top) if ids[i] in relevant]
        mrr += 1 / (ranks[0] + 1) if ranks else 0.0
        entity = {w for w in _words(queries[qid]) if w in names}
        negative = next(i for i in top if ids[i] not in relevant)
        shares_entity += bool(entity) and entity <= set(_words(texts[negative]))
    mrr /= len(qids)
    # random ranking would give MRR@10 ~ 10 / N; lexical matching finds most positives but not all (synonyms)
    assert 0.3 < mrr < 0.95, mrr
    # the strongest negative is usually about the same entity with another attribute: a hard negative
    assert shares_entity / len(qids) > 0.7, shares_entity / len(qids)


def test_test_grades_follow_the_design(sample):
    """Lexical scores rank grade 3 above grade 1-2 (same entity) above grade 0 on average over judged items."""
    d = sample / "passage" / "dataset"
    texts = [r[1] for r in _rows(d / "collection.tsv", "\t")]
    queries = _queries(d / "msmarco-test2019-queries.tsv")
    graded = _trec_qrels(d / "2019qrels-pass.txt", "")
    mean_rank: dict[int, list[float]] = defaultdict(list)
    for qid, judgments in graded.items():
        items = sorted(judgments)
        order = _bm25_top([texts[i] for i in items], [queries[qid]], k=len(items))[0]
        positions = {items[i]: r for r, i in enumerate(order)}
        for item, grade in judgments.items():
            mean_rank[grade].append(positions.get(item, len(items)) / len(items))
    avg = {g: sum(v) / len(v) for g, v in mean_rank.items()}
    assert avg[3] < avg[1] < avg[0] and avg[2] < avg[0], avg


def test_doc_train_run_is_a_trec_bm25_top100_with_positives_and_same_entity_negatives(sample):
    """The BM25 train run (the doc warm-up's negatives): TREC format, every train query, ranks 1..n by score,
    known docids, the positive usually retrieved and the best-ranked negatives about the query's entity."""
    d = sample / "doc" / "dataset"
    queries = _queries(d / "msmarco-doctrain-queries.tsv")
    qrels = _binary_qrels(d / "msmarco-doctrain-qrels.tsv", " ", "D")
    docs = {int(r[0][1:]): " ".join(r[1:]) for r in _rows(d / "msmarco-docs.tsv", "\t")}
    names = _name_words(list(docs.values()))
    run: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
    for row in _rows(d / "msmarco-doctrain-top100", " "):
        assert len(row) == 6 and row[1] == "Q0" and row[2].startswith("D"), row
        run[int(row[0])].append((int(row[3]), int(row[2][1:]), float(row[4])))
    assert list(run) == list(queries)  # query file order
    found, shares_entity = 0, 0
    for qid, ranking in run.items():
        assert 1 <= len(ranking) <= 100 and [r for r, _, _ in ranking] == list(range(1, len(ranking) + 1))
        scores = [s for _, _, s in ranking]
        assert scores == sorted(scores, reverse=True) and all(doc in docs for _, doc, _ in ranking)
        found += bool(qrels[qid] & {doc for _, doc, _ in ranking})
        entity = {w for w in _words(queries[qid]) if w in names}
        negative = next(doc for _, doc, _ in ranking if doc not in qrels[qid])
        shares_entity += bool(entity) and entity <= set(_words(docs[negative]))
    assert found / len(run) > 0.9, found / len(run)
    assert shares_entity / len(run) > 0.7, shares_entity / len(run)
