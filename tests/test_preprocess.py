"""Tests of preprocess.py: the faithful transformers-2.8 tokenization (golden ids, an independent pure-Python
reference of the 2.8 algorithm, other tokenizers), the output files read back with plain numpy/json/pickle,
bad input, and runs on MS MARCO-format files built from the real data in ../shared."""
import gzip
import json
import logging
import pickle
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import regex

import preprocess
from helpers import BERT_IDS, TINY, write_files
from infra.io import InputError

# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def roberta_dir(shared_dir):
    return shared_dir / "data" / "roberta-base-tokenizer"


@pytest.fixture(scope="session")
def roberta(roberta_dir):
    return preprocess.load_tokenizer(roberta_dir)


@pytest.fixture(scope="session")
def golden(shared_dir):
    path = shared_dir / "data" / "tokenizer-golden" / "roberta-2.8-dev.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def bert(bert_dir):
    return preprocess.load_tokenizer(bert_dir)


def bert_ids(text, max_length):
    """Expected ids of whitespace-separated vocabulary words under the tiny BERT tokenizer."""
    ids = [BERT_IDS[w] for w in text.lower().split()][:max_length - 2]
    return [BERT_IDS["[CLS]"], *ids, BERT_IDS["[SEP]"]]


class Reference28:
    """An independent, slow, pure-Python re-implementation of transformers-2.8 RobertaTokenizer.encode with
    do_lower_case=True (GPT-2 byte-level BPE from vocab.json + merges.txt), written from the transformers-2.8 tokenizer's documented behaviour."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    SPECIAL = ["<s>", "</s>", "<unk>", "<pad>", "<mask>"]

    def __init__(self, folder: Path):
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            best = next(p for p in zip(parts, parts[1:]) if self.ranks.get(p) == rank)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def tokens(self, text):
        if text and not text[0].isspace():  # prepare_for_tokenization with add_special_tokens=True
            text = " " + text
        special = "|".join(regex.escape(s) for s in self.SPECIAL)  # lower-case all but special tokens
        text = regex.sub(f"({special})|(.+?)", lambda m: m.group(1) or m.group(2).lower(), text, flags=regex.DOTALL)
        if not text.strip():
            return []
        pieces = [text]
        for tok in self.SPECIAL:  # split on each special token, right-stripping the pieces
            split = []
            for piece in pieces:
                if piece in self.SPECIAL:
                    split.append(piece)
                    continue
                for i, sub in enumerate(piece.split(tok)):
                    sub = sub.rstrip()
                    if i > 0:
                        split.append(tok)
                    if sub:
                        split.append(sub)
            pieces = split
        out = []
        for piece in pieces:
            if piece in self.SPECIAL:
                out.append(piece)
                continue
            for word in self.PATTERN.findall(piece):
                out += self.bpe("".join(self.byte_char[b] for b in word.encode("utf-8")))
        return out

    def encode(self, text, max_length):
        ids = [self.vocab[t] for t in self.tokens(text)][:max_length - 2]
        return [self.vocab["<s>"], *ids, self.vocab["</s>"]]


@pytest.fixture(scope="session")
def reference(roberta_dir):
    return Reference28(roberta_dir)


def golden_truncated(ids, max_length):
    """2.8 ids at a smaller max_length, derived from ids at a larger one: first max_length-1, then </s>."""
    return ids if len(ids) <= max_length else ids[:max_length - 1] + [ids[-1]]


# --------------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------------

def test_every_golden_line_matches(roberta, golden):
    lengths = sorted({row["max_length"] for row in golden})
    mismatches = []
    for max_length in lengths:
        rows = [r for r in golden if r["max_length"] == max_length]
        got = preprocess.encode_texts(roberta, [r["text"] for r in rows], max_length)
        mismatches += [(r["kind"], r["id"], r["text"][:40]) for r, g in zip(rows, got) if g != r["ids"]]
    assert len(golden) == 4758
    assert mismatches == []


@pytest.mark.parametrize("chars_per_token", [12, 5])
def test_prefix_shortcut_gives_identical_ids_on_golden_passages(roberta, golden, chars_per_token):
    passages = [r for r in golden if r["kind"] == "passage"]
    faithful = preprocess.Faithful28Tokenizer(roberta, chars_per_token=chars_per_token)
    for max_length in (64, 24):
        got = faithful.encode([r["text"] for r in passages], max_length)
        expected = [golden_truncated(r["ids"], max_length) for r in passages]
        assert got == expected
    assert faithful.stats["prefix"] > 100  # the shortcut was taken...
    if chars_per_token == 5:
        assert faithful.stats["fallback"] > 10  # ...and too-short prefixes fell back to the full text


@pytest.fixture(scope="session")
def space_merging_bpe():
    """A tiny byte-level BPE whose merges join spaces ('Ġ Ġ'), as code-oriented vocabularies do; it has only
    bos/eos (no cls/sep) special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<s>", "</s>", *sorted(alphabet), "ĠĠ", "ĠĠĠ", "do", "dog"])}
    merges = [("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("d", "o"), ("do", "g")]
    core = Tokenizer(models.BPE(vocab, merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def test_prefix_cut_next_to_whitespace_runs_gives_identical_ids(space_merging_bpe):
    """Cuts landing inside runs of whitespace, at small lengths and chars-per-token settings that make the
    prefix hold just the needed ids: the prefix path equals the full-text path."""
    tok = space_merging_bpe
    texts = [" ".join(["dog"] * k) + run + "tail " * 4 for k in range(1, 7)
             for run in ("  ", "   ", "    ", "\t  ", " \n  ", "\xa0   ")]
    full = preprocess.Faithful28Tokenizer(tok, chars_per_token=None)
    for chars_per_token in (2, 3, 4, 5):
        cut = preprocess.Faithful28Tokenizer(tok, chars_per_token=chars_per_token)
        for max_length in range(3, 12):
            assert cut.encode(texts, max_length) == full.encode(texts, max_length), (chars_per_token, max_length)
        assert cut.stats["prefix"] > 0


def test_reference_agrees_with_golden(reference, golden):
    sample = golden[::9] + [r for r in golden if r["kind"] == "edge"]
    assert [reference.encode(r["text"], r["max_length"]) for r in sample] == [r["ids"] for r in sample]


TRICKY = [
    "a <s> b", "<s> hi", "A <MASK> b  </s>  c", "hi <pad>", "x<mask>y", "<S>", "<unk>\t<unk>x", " <pad> ",
    "ΟΔΟΣ Σ ΣΑ", "\x1cabc", "abc \x1c def", "a\x85b", "\u200bhi there", "\u3000x", "\u2028 y z", "\xa0nbsp",
    "tab\tin\tside", "x  \n  y", "\x0bfoo", "I'M HERE'S", "ǅ ǈ", "ﬃ", "İSTANBUL", "trailing\xa0\xa0", "\t",
    "CamelCaseWord 123,456.78 e-mail@x.org", "what's the u.s. gdp?", "'quoted'", "Ünïcödé ΑΒΓ Кириллица",
]


@pytest.mark.parametrize("max_length", [64, 6])
def test_tricky_texts_match_reference(roberta, reference, max_length):
    got = preprocess.encode_texts(roberta, TRICKY, max_length)
    assert got == [reference.encode(t, max_length) for t in TRICKY]


def test_capital_sigma_is_lowered_character_by_character(roberta):
    """str.lower() turns a word-final Σ into ς; 2.8 lowered one character at a time (σ)."""
    got = preprocess.encode_texts(roberta, ["ΟΔΟΣ", "οδοσ", "οδος"], 64)
    assert got[0] == got[1] != got[2]


def test_backend_prefix_space_and_truncation_state_are_ignored(roberta_dir, golden):
    from transformers import RobertaTokenizerFast

    tok = RobertaTokenizerFast.from_pretrained(str(roberta_dir), add_prefix_space=True)
    tok(["some text to leave truncation on"], truncation=True, max_length=3)
    assert tok.backend_tokenizer.truncation is not None
    edges = [r for r in golden if r["kind"] == "edge" and r["max_length"] == 64]
    assert preprocess.encode_texts(tok, [r["text"] for r in edges], 64) == [r["ids"] for r in edges]
    assert tok.backend_tokenizer.pre_tokenizer.add_prefix_space  # the caller's tokenizer is left unchanged


def test_bert_wordpiece_tokenizer_uses_its_own_special_tokens(bert):
    faithful = preprocess.Faithful28Tokenizer(bert)
    assert not faithful.prefix_space
    texts = ["Hello World", "the cat sat on the mat", "", "   ", "dog " * 3000]
    assert faithful.encode(texts, 6) == [bert_ids(t, 6) for t in texts]
    assert faithful.stats["prefix"] == 1  # the long text went through the prefix shortcut
    assert faithful.encode(["hello [SEP] world"], 16) == [[2, 5, 3, 6, 3]]  # in-text special token


def test_only_the_roberta_emulation_and_lower_casing_tokenizers_are_lower_cased(roberta, bert, tmp_path):
    from transformers import BertTokenizer

    cased_ids = {**BERT_IDS, "Hello": len(BERT_IDS), "World": len(BERT_IDS) + 1}
    BertTokenizer(vocab=cased_ids, do_lower_case=False).save_pretrained(str(tmp_path))
    cased = preprocess.load_tokenizer(tmp_path)
    assert not preprocess.Faithful28Tokenizer(cased).lower_case
    assert preprocess.Faithful28Tokenizer(bert).lower_case  # uncased BERT: lower-cases itself
    assert preprocess.Faithful28Tokenizer(roberta).lower_case  # the 2.8 do_lower_case=True emulation
    assert preprocess.encode_texts(cased, ["Hello World", "hello world", "The cat"], 8) == [
        [2, cased_ids["Hello"], cased_ids["World"], 3], [2, 5, 6, 3], [2, 1, 8, 3]]


def test_encode_limits(roberta):
    assert preprocess.encode_texts(roberta, ["hello world"], 2) == [[0, 2]]
    assert preprocess.encode_texts(roberta, [], 64) == []
    with pytest.raises(ValueError):
        preprocess.encode_texts(roberta, ["x"], 1)


def test_load_tokenizer_needs_a_local_tokenizer_folder(tmp_path):
    with pytest.raises(InputError, match="tokenizer folder not found"):
        preprocess.load_tokenizer(tmp_path / "roberta-base")
    with pytest.raises(InputError, match="cannot load a tokenizer from this folder") as error:
        preprocess.load_tokenizer(tmp_path)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# tiny generated inputs (BERT tokenizer): output files and bad input
# --------------------------------------------------------------------------------------------------

def read_matrix(folder: Path, prefix: str):
    """Independent reader: meta JSON, raw int32 matrix, lengths, ids."""
    meta_text = (folder / f"{prefix}_meta").read_text()
    meta = json.loads(meta_text)
    assert list(meta) == ["type", "total_number", "embedding_size"] and meta["type"] == "int32"
    raw = np.fromfile(folder / f"{prefix}.memmap", dtype=np.int32)
    assert raw.size == meta["total_number"] * meta["embedding_size"]
    matrix = raw.reshape(meta["total_number"], meta["embedding_size"])
    lengths = np.load(folder / f"{prefix}_length.npy")
    ids = np.load(folder / f"{prefix}_ids.npy")
    assert lengths.dtype == np.int32 and ids.dtype == np.int64
    assert lengths.shape == ids.shape == (meta["total_number"],)
    for row, n in zip(matrix, lengths):
        assert not row[n:].any()  # right-padded with 0
    return matrix, lengths, ids


def rows_as_lists(matrix, lengths):
    return [row[:n].tolist() for row, n in zip(matrix, lengths)]


def test_tiny_passage_run_writes_the_documented_files(tmp_path, bert, caplog):
    data = write_files(tmp_path / "dataset", TINY)
    out = tmp_path / "preprocess"
    with caplog.at_level(logging.WARNING):
        counts = preprocess.preprocess(data, out, preprocess.PASSAGE, bert, max_seq_length=6, max_query_length=5)
    assert counts == {"passages": 4, "train": 3, "dev": 1, "lead": 2}
    assert "skipping split 'test'" in caplog.text

    matrix, lengths, ids = read_matrix(out, "passages")
    assert matrix.shape == (4, 6) and ids.tolist() == [7, 3, 10, 0]
    texts = ["Hello world", "The cat sat on the mat", "", "dog cat dog cat dog"]
    assert rows_as_lists(matrix, lengths) == [bert_ids(t, 6) for t in texts]
    assert json.loads((out / "passages_meta").read_text()) == {"type": "int32", "total_number": 4, "embedding_size": 6}
    with open(out / "pid2offset.pickle", "rb") as f:
        assert pickle.load(f) == {7: 0, 3: 1, 10: 2, 0: 3}

    queries, qlengths, qids = read_matrix(out, "train-query")
    assert qids.tolist() == [1, 2, 5]  # query-file order, the unjudged query 3 dropped
    assert rows_as_lists(queries, qlengths) == [bert_ids(t, 5) for t in ["hello", "the cat", "dog"]]
    with open(out / "train-qid2offset.pickle", "rb") as f:
        assert pickle.load(f) == {1: 0, 2: 1, 5: 2}
    assert (out / "train-qrel.tsv").read_text() == "1\t0\t1\t1\n0\t0\t0\t0\n2\t0\t3\t2\n1\t0\t2\t0\n"
    assert (out / "dev-qrel.tsv").read_text() == "0\t0\t1\t1\n"
    lead, lead_lengths, lead_ids = read_matrix(out, "lead-query")
    assert lead_ids.tolist() == [4, 6]
    assert rows_as_lists(lead, lead_lengths) == [bert_ids("a cat", 5), bert_ids("dog", 5)]
    assert not (out / "lead-qrel.tsv").exists() and not (out / "test-query.memmap").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        preprocess.output_names([("train", True), ("dev", True), ("lead", False)]))


def test_tiny_doc_run_composes_url_title_body(tmp_path, roberta, reference):
    files = {
        "msmarco-docs.tsv": b"D12\thttp://A.com/x  \tThe Title \tHello world, body text here.\r\n"
                            b"D5\turl\t\tCat\r\nD300\t\t\t\r\n",
        "msmarco-docdev-queries.tsv": b"1\tWhat is a cat?\r\n2\tunused\r\n",
        "msmarco-docdev-qrels.tsv": b"1\t0\tD5\t1\r\n1\t0\tD300\t0\r\n",
    }
    data = write_files(tmp_path / "dataset", files)
    out = tmp_path / "preprocess"
    counts = preprocess.preprocess(data, out, preprocess.DOC, roberta, max_seq_length=16, max_doc_character=30)
    assert counts == {"passages": 3, "dev": 1}
    matrix, lengths, ids = read_matrix(out, "passages")
    assert ids.tolist() == [12, 5, 300]
    texts = ["http://A.com/x<sep>The Title<sep>Hello world, body text here."[:30], "url<sep><sep>Cat", "<sep><sep>"]
    assert rows_as_lists(matrix, lengths) == [reference.encode(t, 16) for t in texts]
    assert (out / "dev-qrel.tsv").read_text() == "0\t0\t1\t1\n0\t0\t2\t0\n"
    queries, qlengths, qids = read_matrix(out, "dev-query")
    assert qids.tolist() == [1] and rows_as_lists(queries, qlengths) == [reference.encode("What is a cat?", 64)]


def replace(name, content):
    return lambda files: files.update({name: content})


def delete(name):
    return lambda files: files.pop(name)


BAD_INPUT = {
    "collection column count": (replace("collection.tsv", b"7\tHello\n3 The cat\n"), "collection.tsv:2",
                                "expected 2 tab-separated columns, found 1"),
    "collection id not an integer": (replace("collection.tsv", b"x7\tHello\n"), "collection.tsv:1",
                                     "passage id is not an integer (got 'x7')"),
    "duplicate passage id": (replace("collection.tsv", TINY["collection.tsv"] + b"7\tagain\n"), "collection.tsv:5",
                             "duplicate passage id (first on line 1) (got 7)"),
    "query column count": (replace("queries.train.tsv", b"1\thello\n2\tthe\tcat\n"), "queries.train.tsv:2",
                           "expected 2 tab-separated columns, found 3"),
    "query id not an integer": (replace("queries.train.tsv", b"q1\thello\n"), "queries.train.tsv:1",
                                "query id is not an integer (got 'q1')"),
    "duplicate query id": (replace("queries.train.tsv", b"2\tthe cat\n1\thello\n2\tagain\n"), "queries.train.tsv:3",
                           "duplicate query id (first on line 1) (got 2)"),
    "qrels column count": (replace("qrels.train.tsv", b"2 0 3 1\n2\t0\t3\n"), "qrels.train.tsv:2",
                           "expected 4 whitespace-separated columns, found 3"),
    "qrels passage id not an integer": (replace("qrels.train.tsv", b"2 0 D3 1\n"), "qrels.train.tsv:1",
                                        "passage id is not an integer (got 'D3')"),
    "qrels unknown passage": (replace("qrels.train.tsv", b"2 0 3 1\n2 0 99 0\n"), "qrels.train.tsv:2",
                              "passage id is not in the collection (got 99)"),
    "qrels unknown query": (replace("qrels.train.tsv", b"2 0 3 1\n8 0 3 1\n"), "qrels.train.tsv:2",
                            "query id is not in queries.train.tsv (got 8)"),
    "collection not UTF-8": (replace("collection.tsv", b"7\tHello\n3\tcaf\xe9 au lait\n"), "collection.tsv:2",
                             "bytes that are not UTF-8"),
    "queries not UTF-8": (replace("queries.dev.small.tsv", b"9\t\xff\xfe\n"), "queries.dev.small.tsv:1",
                          "bytes that are not UTF-8"),
    "missing collection": (delete("collection.tsv"), "collection.tsv", "collection not found"),
    "missing qrels": (delete("qrels.dev.small.tsv"), "qrels.dev.small.tsv", "qrels file not found"),
    "empty collection": (replace("collection.tsv", b""), "collection.tsv", "the collection is empty"),
    "empty split": (replace("qrels.dev.small.tsv", b""), "queries.dev.small.tsv", "no queries to write"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_file_line_value_and_writes_nothing(tmp_path, bert, case):
    edit, where, message = BAD_INPUT[case]
    files = dict(TINY)
    edit(files)
    data = write_files(tmp_path / "dataset", files)
    out = tmp_path / "preprocess"
    with pytest.raises(InputError) as error:
        preprocess.preprocess(data, out, preprocess.PASSAGE, bert, max_seq_length=6)
    text = str(error.value)
    assert where in text and message in text
    assert not out.exists() or list(out.iterdir()) == []
    assert sorted(p.name for p in data.iterdir()) == sorted(files)


def test_failure_while_writing_removes_every_output(tmp_path, bert, monkeypatch):
    data = write_files(tmp_path / "dataset", TINY)
    out = tmp_path / "preprocess"
    real = preprocess.Faithful28Tokenizer.encode_content

    def fail_on_queries(self, texts, max_length):
        if max_length == 64:
            raise RuntimeError("disk on fire")
        return real(self, texts, max_length)

    monkeypatch.setattr(preprocess.Faithful28Tokenizer, "encode_content", fail_on_queries)
    with pytest.raises(RuntimeError, match="disk on fire"):
        preprocess.preprocess(data, out, preprocess.PASSAGE, bert, max_seq_length=6)
    assert list(out.iterdir()) == []  # passages.* were complete but are not left behind


def test_existing_output_is_refused_unless_overwrite(tmp_path, bert):
    data = write_files(tmp_path / "dataset", TINY)
    out = tmp_path / "preprocess"
    out.mkdir()
    (out / "dev-qrel.tsv").write_text("old")
    with pytest.raises(InputError, match="dev-qrel.tsv: output already exists; pass --overwrite"):
        preprocess.preprocess(data, out, preprocess.PASSAGE, bert, max_seq_length=6)
    assert (out / "dev-qrel.tsv").read_text() == "old"
    preprocess.preprocess(data, out, preprocess.PASSAGE, bert, max_seq_length=6, overwrite=True)
    assert (out / "dev-qrel.tsv").read_text() == "0\t0\t1\t1\n"


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, bert_dir, repo_dir):
    files = dict(TINY, **{"collection.tsv": b"7\tHello\n3\tcat\nnine\tdog\n"})
    data = write_files(tmp_path / "dataset", files)
    result = subprocess.run([sys.executable, "preprocess.py", "--model_name_or_path", str(bert_dir),
                             "--data_dir", str(data), "--out_dir", str(tmp_path / "out")],
                            cwd=repo_dir, capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {data / 'collection.tsv'}:3: passage id is not an integer (got 'nine')"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# MS MARCO-format files built from the real data in ../shared
# --------------------------------------------------------------------------------------------------

def subset_passages(shared_dir):
    path = shared_dir / "data" / "msmarco-passage-dl19-judged-subset" / "collection.tsv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(int(pid), text) for pid, text in (line.rstrip("\n").split("\t") for line in f)]


def qrels_lines(path, keep=lambda i, fields: True):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for i, line in enumerate(lines) if keep(i, line.split())]


def mapped_back(out, split):
    """The qrels of a split read back from offset space to official ids: (qid, id, grade) per line."""
    pids = np.load(out / "passages_ids.npy")
    qids = np.load(out / f"{split}-query_ids.npy")
    rows = [line.split("\t") for line in (out / f"{split}-qrel.tsv").read_text().splitlines()]
    assert all(r[1] == "0" for r in rows)
    return [(int(qids[int(q)]), int(pids[int(p)]), g) for q, _, p, g in rows]


def official(lines, data_type):
    strip = (lambda d: d[1:]) if data_type == preprocess.DOC else (lambda d: d)
    return [(int(f[0]), int(strip(f[2])), f[3]) for f in (line.split() for line in lines)]


def test_real_passage_files_end_to_end(tmp_path, shared_dir, roberta_dir, golden, reference):
    evals = shared_dir / "data" / "msmarco-passage-eval"
    passages = subset_passages(shared_dir)
    test_qrels = qrels_lines(evals / "2019qrels-pass.txt")
    leading_space = {2}  # dev query "2\t Androgen receptor define"
    dev_qrels = qrels_lines(evals / "qrels.dev.small.tsv", lambda i, f: i < 300 or int(f[0]) in leading_space)
    present = {pid for pid, _ in passages}
    missing = sorted({int(line.split()[2]) for line in test_qrels + dev_qrels} - present)
    filler = [(pid, passages[i % len(passages)][1]) for i, pid in enumerate(missing)]
    collection = passages + filler  # every judged pid exists; grade-0 pids get borrowed real text
    dataset = tmp_path / "passage" / "dataset"
    write_files(dataset, {
        "collection.tsv": "".join(f"{pid}\t{text}\r\n" for pid, text in collection).encode(),
        "msmarco-test2019-queries.tsv": (evals / "msmarco-test2019-queries.tsv").read_bytes(),  # CRLF
        "2019qrels-pass.txt": "\n".join(test_qrels).encode() + b"\n",  # space-separated, grades 0-3
        "queries.dev.small.tsv": (evals / "queries.dev.small.tsv").read_bytes(),
        "qrels.dev.small.tsv": "\n".join(dev_qrels).encode() + b"\n",  # tab-separated
        "queries.eval.small.tsv": (evals / "msmarco-test2020-queries.tsv").read_bytes(),
    })
    out = tmp_path / "passage" / "preprocess"
    assert preprocess.main(["--data_type", "1", "--model_name_or_path", str(roberta_dir), "--data_dir", str(dataset),
                            "--out_dir", str(out), "--threads", "2"]) == 0

    matrix, lengths, ids = read_matrix(out, "passages")
    assert matrix.shape == (len(collection), 512) and ids.tolist() == [pid for pid, _ in collection]
    assert (matrix[:, 0] == 0).all() and (matrix[np.arange(len(ids)), lengths - 1] == 2).all()
    offset = {pid: i for i, pid in enumerate(ids.tolist())}
    golden_passages = [r for r in golden if r["kind"] == "passage"]
    assert len(golden_passages) == 2052
    assert all(matrix[offset[int(r["id"])], :lengths[offset[int(r["id"])]]].tolist() == r["ids"]
               for r in golden_passages)
    with open(out / "pid2offset.pickle", "rb") as f:
        assert pickle.load(f) == offset

    golden_queries = {int(r["id"]): r["ids"] for r in golden if r["kind"] == "query"}
    test_q, test_len, test_qids = read_matrix(out, "test-query")
    test_lines = (evals / "msmarco-test2019-queries.tsv").read_text().splitlines()
    file_order = [int(line.split("\t")[0]) for line in test_lines]
    judged = {q for q, _, _ in official(test_qrels, preprocess.PASSAGE)}
    assert test_qids.tolist() == [q for q in file_order if q in judged] and len(judged) == 43
    test_text = dict(line.split("\t") for line in test_lines)
    test_rows = rows_as_lists(test_q, test_len)
    assert test_rows == [reference.encode(test_text[str(q)].rstrip(), 64) for q in test_qids]
    in_golden = [(row, golden_queries[q]) for row, q in zip(test_rows, test_qids.tolist()) if q in golden_queries]
    assert len(in_golden) == 22 and all(row == ids_ for row, ids_ in in_golden)
    assert mapped_back(out, "test") == official(test_qrels, preprocess.PASSAGE)
    assert sum(g == "0" for _, _, g in mapped_back(out, "test")) == 5158

    dev_q, dev_len, dev_qids = read_matrix(out, "dev-query")
    dev_text = dict(line.split("\t") for line in (evals / "queries.dev.small.tsv").read_text().splitlines())
    assert 2 in dev_qids.tolist() and dev_text["2"].startswith(" ")
    assert rows_as_lists(dev_q, dev_len) == [reference.encode(dev_text[str(q)].rstrip(), 64) for q in dev_qids]
    assert mapped_back(out, "dev") == official(dev_qrels, preprocess.PASSAGE)

    lead_q, lead_len, lead_qids = read_matrix(out, "lead-query")
    assert len(lead_qids) == 200 and not (out / "lead-qrel.tsv").exists()
    assert not (out / "train-query.memmap").exists()


def test_real_doc_files_via_the_script(tmp_path, shared_dir, roberta, roberta_dir, repo_dir, golden, reference):
    evals = shared_dir / "data" / "msmarco-doc-eval"
    dev_qrels = qrels_lines(evals / "msmarco-docdev-qrels.tsv", lambda i, f: i < 150)
    test_qrels = qrels_lines(evals / "2019qrels-docs.txt", lambda i, f: i < 300)
    docids = sorted({int(line.split()[2][1:]) for line in dev_qrels + test_qrels}, key=lambda d: (d * 7919) % 10007)
    passages = [text for _, text in subset_passages(shared_dir)]
    docs = []
    for i, docid in enumerate(docids):
        body = " ".join(passages[(i * 5 + k) % len(passages)] for k in range(4 + i % 20))
        docs.append((docid, f"http://www.example.com/{docid}/ ", passages[i % len(passages)][:50] + "  ", body + " "))
    dataset = tmp_path / "doc" / "dataset"
    write_files(dataset, {
        "msmarco-docs.tsv": "".join(f"D{d}\t{u}\t{t}\t{b}\r\n" for d, u, t, b in docs).encode(),
        "msmarco-docdev-queries.tsv": (evals / "msmarco-docdev-queries.tsv").read_bytes(),  # CRLF
        "msmarco-docdev-qrels.tsv": "\r\n".join(dev_qrels).encode() + b"\r\n",  # tab, CRLF, D ids
        "msmarco-test2019-queries.tsv": (shared_dir / "data" / "msmarco-passage-eval" / "msmarco-test2019-queries.tsv")
        .read_bytes(),
        "2019qrels-docs.txt": "\n".join(test_qrels).encode() + b"\n",  # space-separated, D ids
    })
    out = tmp_path / "doc" / "preprocess"
    result = subprocess.run([sys.executable, "preprocess.py", "--data_type", "0", "--max_seq_length", "128",
                             "--max_doc_character", "2000", "--model_name_or_path", str(roberta_dir),
                             "--data_dir", str(dataset), "--out_dir", str(out), "--threads", "2"],
                            cwd=repo_dir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipping split 'train'" in result.stderr and "skipping split 'lead'" in result.stderr

    matrix, lengths, ids = read_matrix(out, "passages")
    assert ids.tolist() == docids and matrix.shape == (len(docs), 128)
    texts = ["<sep>".join(field.rstrip() for field in (u, t, b))[:2000] for _, u, t, b in docs]
    full_text = preprocess.Faithful28Tokenizer(roberta, chars_per_token=None)  # no prefix shortcut
    assert rows_as_lists(matrix, lengths) == full_text.encode(texts, 128)
    assert rows_as_lists(matrix[:3], lengths[:3]) == [reference.encode(t, 128) for t in texts[:3]]
    assert (lengths == 128).mean() > 0.9

    golden_queries = {int(r["id"]): r["ids"] for r in golden if r["kind"] == "query"}
    dev_q, dev_len, dev_qids = read_matrix(out, "dev-query")
    assert sorted(dev_qids.tolist()) == sorted({q for q, _, _ in official(dev_qrels, preprocess.DOC)})
    dev_rows = rows_as_lists(dev_q, dev_len)
    dev_text = dict(line.split("\t") for line in (evals / "msmarco-docdev-queries.tsv").read_text().splitlines())
    assert dev_rows == [reference.encode(dev_text[str(q)].rstrip(), 64) for q in dev_qids]
    in_golden = [(row, golden_queries[q]) for row, q in zip(dev_rows, dev_qids.tolist()) if q in golden_queries]
    assert len(in_golden) > 30 and all(row == ids_ for row, ids_ in in_golden)
    assert mapped_back(out, "dev") == official(dev_qrels, preprocess.DOC)
    assert mapped_back(out, "test") == official(test_qrels, preprocess.DOC)


@pytest.mark.parametrize("data_type", [preprocess.PASSAGE, preprocess.DOC])
def test_real_dl20_files_give_the_test2020_split_and_are_skipped_when_absent(tmp_path, shared_dir, roberta, caplog,
                                                                              data_type):
    """TREC DL 2020 (the passage and doc tasks share its queries): the test2020 split keeps the judged queries in
    query-file order and every graded qrels line; without the DL20 files it is skipped and the other outputs are
    byte for byte those of the run with them."""
    task = "pass" if data_type == preprocess.PASSAGE else "docs"
    evals = shared_dir / "data" / ("msmarco-passage-eval" if data_type == preprocess.PASSAGE else "msmarco-doc-eval")
    queries = shared_dir / "data" / "msmarco-passage-eval"

    def first_judged(path, n):  # every qrels line of the first n judged queries
        qids = list(dict.fromkeys(line.split()[0] for line in qrels_lines(path)))[:n]
        return qrels_lines(path, lambda i, f: f[0] in qids)

    dl19, dl20 = first_judged(evals / f"2019qrels-{task}.txt", 2), first_judged(evals / f"2020qrels-{task}.txt", 4)
    ids = sorted({line.split()[2] for line in dl19 + dl20})
    texts = [text for _, text in subset_passages(shared_dir)]
    if data_type == preprocess.PASSAGE:
        collection = {"collection.tsv": "".join(f"{d}\t{texts[i]}\n" for i, d in enumerate(ids))}
    else:
        collection = {"msmarco-docs.tsv": "".join(f"{d}\turl\ttitle\t{texts[i]}\n" for i, d in enumerate(ids))}
    files = {name: text.encode() for name, text in collection.items()}
    files.update({
        "msmarco-test2019-queries.tsv": (queries / "msmarco-test2019-queries.tsv").read_bytes(),
        f"2019qrels-{task}.txt": "\n".join(dl19).encode() + b"\n",
        "msmarco-test2020-queries.tsv": (queries / "msmarco-test2020-queries.tsv").read_bytes(),  # CRLF, 200
        f"2020qrels-{task}.txt": "\n".join(dl20).encode() + b"\n",  # `qid 0 id grade`, grades 0-3
    })
    out = tmp_path / "with" / "preprocess"
    counts = preprocess.preprocess(write_files(tmp_path / "with" / "dataset", files), out, data_type, roberta,
                                   max_seq_length=16, max_query_length=16)
    assert counts == {"passages": len(ids), "test": 2, "test2020": 4}
    lines = (queries / "msmarco-test2020-queries.tsv").read_text().splitlines()
    judged = {q for q, _, _ in official(dl20, data_type)}
    _, _, qids = read_matrix(out, "test2020-query")
    assert qids.tolist() == [int(line.split("\t")[0]) for line in lines if int(line.split("\t")[0]) in judged]
    assert mapped_back(out, "test2020") == official(dl20, data_type)
    assert {g for _, _, g in mapped_back(out, "test2020")} == {"0", "1", "2", "3"}

    del files["msmarco-test2020-queries.tsv"], files[f"2020qrels-{task}.txt"]
    without = tmp_path / "without" / "preprocess"
    with caplog.at_level(logging.WARNING):
        counts = preprocess.preprocess(write_files(tmp_path / "without" / "dataset", files), without, data_type,
                                       roberta, max_seq_length=16, max_query_length=16)
    assert counts == {"passages": len(ids), "test": 2}
    assert "skipping split 'test2020'" in caplog.text
    names = preprocess.output_names([("test", True)])
    assert sorted(p.name for p in without.iterdir()) == sorted(names)
    assert all((without / name).read_bytes() == (out / name).read_bytes() for name in names)
