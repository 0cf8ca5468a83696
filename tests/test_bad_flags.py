"""Numeric flags (issue #15, classes 1 and 5).

Class 1: every count, length, size, seed and cut of every CLI is range-checked while the command line is parsed
(the shared ``cli_types``), so a bad value is a usage error naming the flag and the value, before any file is read
or written.  Class 5: no flag value can exhaust memory: work is sized by the data (search results at most N wide,
ranks tracked as the file gives them, batches bounded by the rows, lengths by the stored token width) or by the
machine (memory budget, threads, workers), or refused at once with a message naming the flag and the file.
"""
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from infra import cli_types as ct
from helpers import (N_DOCS, N_QUERIES, REPO, TINY, adore_cli_args, assert_one_error, make_adore_data,
                     make_encoder_inputs, make_star_data, run_cli, star_cli_args, tree_hash, write_files,
                     write_token_memmap)
from infra.io import InputError

HUGE = str(10 ** 12)

# The arguments each CLI requires; parsing stops at the bad flag, so none of these paths is ever read.
REQUIRED = {
    "preprocess": [],
    "sample_data": [],
    "star.train": ["--init_path", "m", "--preprocess_dir", "p"],
    "star.inference": ["--data_type", "passage", "--mode", "dev"],
    "star.prepare_hardneg": ["--data_type", "passage"],
    "adore.train": ["--init_path", "m", "--preprocess_dir", "p", "--pembed_path", "e", "--model_save_dir", "o"],
    "adore.inference": ["--model_dir", "m", "--output_dir", "o", "--preprocess_dir", "p", "--mode", "dev",
                        "--dmemmap_path", "e"],
    "msmarco_eval": ["ref", "cand"],
    "cvt_back": ["--input_dir", "i", "--preprocess_dir", "p", "--mode", "dev", "--output_dir", "o", "--dataset",
                 "passage"],
    "results_table": ["--root", "r"],
    "export_sentence_transformers": ["--model_dir", "m", "--output_dir", "o"],
}
TRAINERS = ("star.train", "adore.train")
SEARCHERS = ("star.inference", "star.prepare_hardneg", "adore.inference")

SHARED_TRAINING = [("--logging_steps", "0"), ("--save_steps", "-1"), ("--save_total_limit", "-1"),
                   ("--gradient_accumulation_steps", "0"), ("--learning_rate", "-0.5"), ("--weight_decay", "nan"),
                   ("--adam_epsilon", "-1"), ("--max_grad_norm", "inf"), ("--num_train_epochs", "-1"),
                   ("--max_steps", "-2"), ("--warmup_steps", "-1"), ("--seed", "-1"), ("--seed", str(2 ** 32)),
                   ("--dataloader_num_workers", "-1")]
SHARED_SEARCH = [("--topk", "0"), ("--topk", "-3"), ("--faiss_gpus", "-1"), ("--search_mem_gb", "0"),
                 ("--search_mem_gb", "inf")]
BAD = [
    ("preprocess", "--max_seq_length", "1"), ("preprocess", "--max_query_length", "1"),
    ("preprocess", "--max_seq_length", HUGE), ("preprocess", "--max_doc_character", "0"),
    ("preprocess", "--threads", "0"), ("preprocess", "--data_type", "7"), ("preprocess", "--data_type", "x"),
    ("sample_data", "--seed", "-1"), ("sample_data", "--seed", "1.5"),
    ("star.train", "--hard_num", "0"), ("star.train", "--rand_num", "0"), ("star.train", "--max_query_length", "0"),
    ("star.train", "--max_doc_length", "0"), ("star.train", "--per_device_train_batch_size", "0"),
    ("star.train", "--adam_beta1", "1"), ("star.train", "--adam_beta2", "-0.1"),
    ("star.train", "--stop_after_steps", "0"), ("star.train", "--local_rank", "-2"),
    ("adore.train", "--max_seq_length", "0"), ("adore.train", "--metric_cut", "0"), ("adore.train", "--neg_topk", "0"),
    ("adore.train", "--per_gpu_batch_size", "0"), ("adore.train", "--model_gpu_index", "-1"),
    ("adore.train", "--faiss_gpu_index", "-1"), ("adore.train", "--faiss_omp_num_threads", "0"),
    ("star.inference", "--max_query_length", "0"), ("star.inference", "--max_doc_length", "0"),
    ("star.inference", "--eval_batch_size", "0"),
    ("star.prepare_hardneg", "--max_query_length", "0"), ("star.prepare_hardneg", "--max_doc_length", "-1"),
    ("star.prepare_hardneg", "--eval_batch_size", "0"), ("star.prepare_hardneg", "--seed", "-1"),
    ("adore.inference", "--max_seq_length", "0"), ("adore.inference", "--pergpu_eval_batch_size", "0"),
    ("msmarco_eval", "--max_rank", "0"), ("msmarco_eval", "--rel_threshold", "1.5"), ("msmarco_eval", "mode", "0"),
    ("results_table", "--query_length", "0"), ("results_table", "--adore_query_length", "0"),
    ("results_table", "--doc_length", "0"), ("results_table", "--batch_size", "-1"),
    ("results_table", "--tolerance", "-0.1"),
    ("export_sentence_transformers", "--max_seq_length", "1"),
    *((cli, flag, value) for cli in TRAINERS for flag, value in SHARED_TRAINING),
    *((cli, flag, value) for cli in SEARCHERS for flag, value in SHARED_SEARCH),
]
# Values at the edge of each range stay accepted, with their meaning (0 = off, -1 = unset, ...).
EDGES = [
    ("star.train", ["--save_steps", "0", "--save_total_limit", "0", "--max_steps", "-1", "--max_grad_norm", "-1",
                    "--num_train_epochs", "0", "--adam_beta1", "0", "--adam_beta2", "0.999999", "--learning_rate",
                    "0", "--warmup_steps", "0", "--dataloader_num_workers", "0", "--seed", str(2 ** 32 - 1),
                    "--local_rank", "-1"],
     {"save_steps": 0, "save_total_limit": 0, "max_steps": -1, "max_grad_norm": -1.0, "num_train_epochs": 0.0,
      "adam_beta1": 0.0, "seed": 2 ** 32 - 1, "local_rank": -1}),
    ("adore.train", ["--model_gpu_index", "0", "--faiss_gpu_index", "0", "1", "--metric_cut", "1"],
     {"model_gpu_index": 0, "faiss_gpu_index": [0, 1], "metric_cut": 1}),
    ("adore.train", ["--faiss_gpus", "0", "1", "--doc_embeddings", "e2"],
     {"faiss_gpu_index": [0, 1], "pembed_path": "e2"}),
    ("adore.inference", ["--doc_embeddings", "e2"], {"dmemmap_path": "e2"}),
    ("preprocess", ["--max_seq_length", "2", "--max_query_length", "2", "--data_type", "0"],
     {"max_seq_length": 2, "max_query_length": 2, "data_type": 0}),
    ("msmarco_eval", ["--rel_threshold", "-1", "--max_rank", "1"], {"rel_threshold": -1, "max_rank": 1}),
    ("star.inference", ["--topk", "1", "--faiss_gpus", "0", "--search_mem_gb", "1e-9"],
     {"topk": 1, "faiss_gpus": [0], "search_mem_gb": 1e-9}),
]


def parser_of(cli: str):
    return importlib.import_module(cli).build_parser()


def cli_modules() -> set[str]:
    """Every module run through ``infra.io.run_cli`` (a CLI), found in the source."""
    files = [*REPO.glob("*.py"), *REPO.glob("star/*.py"), *REPO.glob("adore/*.py")]
    return {".".join(p.relative_to(REPO).with_suffix("").parts) for p in files
            if re.search(r"^\s+run_cli\(main\b", p.read_text(encoding="utf-8"), flags=re.M)}


# -- class 1: ranges checked while parsing ---------------------------------------------------------------------

@pytest.mark.parametrize("cli, flag, value", BAD, ids=[f"{c} {f} {v}" for c, f, v in BAD])
def test_bad_value_is_a_usage_error_naming_flag_and_value(capsys, cli, flag, value):
    args = REQUIRED[cli] + ([flag, value] if flag.startswith("--") else [value])  # "mode": a positional
    with pytest.raises(SystemExit) as exit_info:
        parser_of(cli).parse_args(args)
    usage = subprocess.CompletedProcess(args, exit_info.value.code, "", capsys.readouterr().err)
    assert_one_error(usage, f"argument {flag}", value)


@pytest.mark.parametrize("cli, args, expected", EDGES, ids=[e[0] for e in EDGES])
def test_values_at_the_edge_of_each_range_are_accepted(cli, args, expected):
    parsed = vars(parser_of(cli).parse_args(REQUIRED[cli] + args))
    assert {key: parsed[key] for key in expected} == expected


def test_every_numeric_flag_of_every_cli_uses_a_cli_types_range():
    """A future flag with ``type=int`` / ``type=float`` (or a numeric default and no type) fails here."""
    assert cli_modules() == set(REQUIRED), "a CLI was added or removed: update REQUIRED"
    unchecked, checked = [], {}
    for cli in sorted(REQUIRED):
        for action in parser_of(cli)._actions:
            if action.nargs == 0:  # store_true / store_const / help: no value parsed
                continue
            from_cli_types = getattr(action.type, "__module__", None) == "infra.cli_types"
            numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
            if action.type in (int, float) or (numeric_default and not from_cli_types):
                unchecked.append(f"{cli} {action.dest}")
            checked[cli] = checked.get(cli, 0) + from_cli_types
    assert not unchecked, f"numeric flags without a cli_types range: {unchecked}"
    assert all(checked[cli] for cli in REQUIRED if cli != "cvt_back"), checked  # the walk saw the flags


ISSUE_EXAMPLES = {
    "star.inference --topk 0": (["-m", "star.inference", "--data_type", "passage", "--mode", "dev", "--topk", "0"],
                                "dev.rank.tsv", "--topk", "'0'"),
    "adore.inference --topk -3": (["-m", "adore.inference", "--mode", "dev", "--topk", "-3"], "dev.rank.tsv",
                                  "--topk", "'-3'"),
    "star.train --seed -1": (["-m", "star.train", "--seed", "-1"], "checkpoint-1/trainer_state.pt", "--seed",
                             "'-1'"),
}


@pytest.mark.parametrize("case", list(ISSUE_EXAMPLES))
@pytest.mark.slow
def test_issue_examples_fail_at_once_and_touch_nothing(tmp_path, case):
    """The issue's examples through the real CLIs: exit 2, one usage error line, no traceback; the inputs and an
    existing output are left byte-identical and nothing is added."""
    command, existing, *needles = ISSUE_EXAMPLES[case]
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "passages_meta").write_text('{"type": "int32", "total_number": 1, "embedding_size": 4}')
    (tmp_path / "out" / existing).parent.mkdir(parents=True)
    (tmp_path / "out" / existing).write_bytes(b"old output\n")
    before = tree_hash(tmp_path, skip_tmp=False)
    paths = {"star.inference": ["--preprocess_dir", "pre", "--model_dir", "model", "--output_dir", "out"],
             "adore.inference": ["--preprocess_dir", "pre", "--model_dir", "model", "--output_dir", "out",
                                 "--dmemmap_path", "pre/e.memmap"],
             "star.train": ["--preprocess_dir", "pre", "--init_path", "model", "--output_dir", "out"]}
    cli = command[1]
    result = run_cli([*command, *(str(tmp_path / p) if not p.startswith("--") else p for p in paths[cli])])
    assert_one_error(result, "error: argument", *needles)
    assert tree_hash(tmp_path, skip_tmp=False) == before


# -- class 5: no flag value can exhaust memory -------------------------------------------------------------------

def test_msmarco_eval_max_rank_takes_memory_of_the_file_not_of_the_flag(tmp_path):
    import msmarco_eval as me

    ref, cand = tmp_path / "qrels.tsv", tmp_path / "run.tsv"
    ref.write_text("".join(f"{q}\t0\t{q * 10 + 3}\t1\n" for q in range(300)))
    cand.write_text("".join(f"{q}\t{q * 10 + r}\t{r}\n" for q in range(300) for r in range(1, 6)))
    tracemalloc.start()
    try:
        huge = me.main([str(ref), str(cand), "--max_rank", HUGE, "--metrics", "R@1000000"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak  # a byte per rank slot would be 300 x 10**12 bytes
    assert huge == me.main([str(ref), str(cand), "--metrics", "R@1000000"])
    assert huge["MRR@10"] == pytest.approx(1 / 3)


def test_searches_with_a_huge_k_return_each_row_once_and_no_padding(one_thread):
    from infra.exact_search import FlatIPIndex, exact_search, streamed_search
    from infra.training_index import TensorIPIndex, build_training_index

    rng = np.random.default_rng(5)
    docs = rng.integers(-2, 3, size=(50, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(9, 8)).astype(np.float32)
    expected = FlatIPIndex(docs).search(queries, 50, desc=None)
    huge = 10 ** 12
    results = {
        "faiss": FlatIPIndex(docs).search(queries, huge, desc=None),
        "streamed": streamed_search(docs, queries, huge, block_rows=16, desc=None),
        "exact_search": exact_search(docs, queries, huge, desc=None),
        "tensor fp32": TensorIPIndex(docs).search(queries, huge),
        "training index": build_training_index(docs, "tensor").search(queries, huge),
    }
    for name, (scores, ids) in results.items():
        assert ids.shape == scores.shape == (9, 50), name
        np.testing.assert_array_equal(ids, expected[1], err_msg=name)
        np.testing.assert_array_equal(scores, expected[0], err_msg=name)


def test_search_memory_budget_is_capped_at_the_machine_memory(caplog):
    from infra import exact_search

    total = exact_search.physical_memory_bytes()
    with caplog.at_level(logging.WARNING, logger="infra.exact_search"):
        assert exact_search.memory_budget_bytes(1e12) == total
        assert exact_search.memory_budget_bytes(1e300) == total  # no float overflow
    assert "--search_mem_gb 1e+12 exceeds the machine's" in caplog.text
    assert exact_search.memory_budget_bytes(0.5) == 1 << 29


def test_thread_and_worker_counts_are_capped_at_the_cpus(caplog):
    cpus = os.cpu_count() or 1
    with caplog.at_level(logging.WARNING, logger="infra.cli_types"):
        assert ct.at_most_cpus(10 ** 12, "--threads") == cpus
    assert f"--threads {10 ** 12} exceeds the {cpus} CPUs" in caplog.text
    assert ct.at_most_cpus(1, "--threads") == 1 and ct.at_most_cpus(None, "--threads") is None


def test_star_inference_with_absurd_sizes_ranks_every_document(tmp_path, one_thread):
    """--topk, --eval_batch_size, the lengths and --search_mem_gb at 10**12: the work is sized by the data."""
    from infra.exact_search import exact_search
    from star import inference as star_inference

    inputs = make_encoder_inputs(tmp_path)
    out = tmp_path / "out"
    star_inference.main(["--data_type", "passage", "--mode", "dev", "--model_dir", str(inputs["model"]),
                         "--preprocess_dir", str(inputs["pre"]), "--output_dir", str(out), "--no_cuda",
                         "--topk", HUGE, "--eval_batch_size", HUGE, "--max_doc_length", HUGE,
                         "--max_query_length", HUGE, "--search_mem_gb", "1e12"])
    ranks = np.loadtxt(out / "dev.rank.tsv", dtype=np.int64).reshape(N_QUERIES, N_DOCS, 3)
    docs = np.fromfile(out / "passages.memmap", np.float32).reshape(N_DOCS, -1)
    queries = np.fromfile(out / "dev-query.memmap", np.float32).reshape(N_QUERIES, -1)
    np.testing.assert_array_equal(ranks[:, :, 1], exact_search(docs, queries, N_DOCS, desc=None)[1])


def test_prepare_hardneg_topk_above_the_corpus_fails_before_encoding(tmp_path):
    from star import prepare_hardneg as ph

    inputs = make_encoder_inputs(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"--topk must be below the {N_DOCS} documents") as error:
        ph.main(["--data_type", "passage", "--model_dir", str(inputs["model"]), "--preprocess_dir",
                 str(inputs["pre"]), "--output_dir", str(out), "--no_cuda", "--topk", HUGE])
    assert Path(error.value.path) == inputs["pre"] / "passages.memmap" and not out.exists()


@pytest.mark.parametrize("flag, mode, bound", [("--hard_num", "star", "negatives per query in the file"),
                                               ("--rand_num", "rand", "documents in the corpus")])
def test_star_train_negatives_beyond_the_data_fail_before_training(tmp_path, one_thread, flag, mode, bound):
    from star import train as star_train

    data = make_star_data(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{flag[2:]} must lie in \\[1, [0-9]+\\] \\({bound}\\)") as error:
        star_train.main(star_cli_args(data, out, mode, flag, HUGE))
    assert error.value.value == 10 ** 12 and not list(out.glob("checkpoint-*"))
    named = data["pre"] / "passages.memmap" if mode == "rand" else data["hard"]
    assert Path(error.value.path) == named


def test_star_train_with_absurd_sizes_trains_within_the_data(tmp_path, one_thread):
    """Lengths past the stored width are capped at it (the first batches are padded to full length), a batch
    larger than the training set is the whole set."""
    from star import train as star_train

    data = make_star_data(tmp_path)
    out = tmp_path / "out"
    star_train.main(star_cli_args(data, out, "star", "--max_steps", "1", "--max_query_length", HUGE,
                                  "--max_doc_length", HUGE, "--per_device_train_batch_size", HUGE,
                                  "--gradient_accumulation_steps", HUGE, "--warmup_steps", HUGE,
                                  "--logging_steps", HUGE, "--save_steps", HUGE, "--save_total_limit", HUGE))
    saved = json.loads((out / "training_args.json").read_text())
    widths = [json.loads((data["pre"] / f"{p}_meta").read_text())["embedding_size"] for p in ("train-query",
                                                                                               "passages")]
    assert [saved["max_query_length"], saved["max_doc_length"]] == widths
    assert (out / "checkpoint-1").is_dir()


def test_adore_train_with_absurd_sizes_trains_within_the_data(tmp_path, one_thread):
    """K, the metric cut, the query length and the batch at 10**12."""
    from adore import train as adore_train

    data = make_adore_data(tmp_path)
    out = tmp_path / "out"
    adore_train.main(adore_cli_args(data, out, "--max_steps", "1", "--neg_topk", HUGE, "--metric_cut", HUGE,
                                    "--max_seq_length", HUGE, "--per_gpu_batch_size", HUGE, "--index_backend",
                                    "tensor"))
    assert (out / "checkpoint-1").is_dir()


def test_preprocess_width_is_capped_by_the_tokenizer_model_max_length(tmp_path, bert_dir, caplog):
    import preprocess

    tokenizer = shutil.copytree(bert_dir, tmp_path / "tokenizer")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 5}))
    data, out = write_files(tmp_path / "dataset", TINY), tmp_path / "out"
    top = str(ct.MAX_TOKENS)
    with caplog.at_level(logging.WARNING, logger="preprocess"):
        preprocess.main(["--model_name_or_path", str(tokenizer), "--data_dir", str(data), "--out_dir", str(out),
                         "--max_seq_length", top, "--max_query_length", top, "--threads", HUGE])
    for prefix in ("passages", "train-query"):
        assert json.loads((out / f"{prefix}_meta").read_text())["embedding_size"] == 5
    assert f"--max_seq_length {top} exceeds the tokenizer's model_max_length 5" in caplog.text
    assert f"--threads {HUGE} exceeds the" in caplog.text


def test_training_lengths_and_workers_are_capped_by_the_data_and_the_cpus(tmp_path):
    import argparse

    from dataset import TokenIdsCache
    from infra.training_loop import cap_training_args

    write_token_memmap(tmp_path, "passages", [3, 5, 4], width=7, seed=0)
    args = argparse.Namespace(preprocess_dir=str(tmp_path), max_doc_length=10 ** 12, dataloader_num_workers=10 ** 12)
    cap_training_args(args, {"max_doc_length": TokenIdsCache(tmp_path, "passages")})
    assert (args.max_doc_length, args.dataloader_num_workers) == (7, os.cpu_count() or 1)
    args.max_doc_length, args.dataloader_num_workers = 6, 0
    cap_training_args(args, {"max_doc_length": TokenIdsCache(tmp_path, "passages")})
    assert (args.max_doc_length, args.dataloader_num_workers) == (6, 0)  # within the bounds: unchanged
