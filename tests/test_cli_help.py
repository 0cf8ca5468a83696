"""Every command reads in a minute (issue #19): ``--help`` names the command as it is run (``python -m NAME``),
fits 80 lines of at most 80 columns and still lists every flag; each command's module docstring is at most 15
lines (the details live in function docstrings and docs/deviations.md)."""
import argparse
import ast
import importlib
from pathlib import Path

import pytest

COMMANDS = ["preprocess", "star.prepare_hardneg", "star.train", "star.inference", "adore.train", "adore.inference",
            "msmarco_eval", "cvt_back", "results_table", "export_sentence_transformers", "sample_data"]
MAX_HELP_LINES = 80
COLUMNS = 80
MAX_DOCSTRING_LINES = 15


def help_text(module: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, str]:
    monkeypatch.setenv("COLUMNS", str(COLUMNS))  # argparse sizes its output by the terminal width
    parser = importlib.import_module(module).build_parser()
    return parser, parser.format_help()


@pytest.mark.parametrize("module", COMMANDS)
def test_help_names_the_command_and_fits_a_screen(module, monkeypatch):
    parser, text = help_text(module, monkeypatch)
    assert parser.prog == f"python -m {module}"
    assert text.startswith(f"usage: python -m {module} ")
    lines = text.splitlines()
    assert len(lines) <= MAX_HELP_LINES, f"{module} --help has {len(lines)} lines"
    too_wide = [line for line in lines if len(line) > COLUMNS]
    assert not too_wide, too_wide


@pytest.mark.parametrize("module", COMMANDS)
def test_help_lists_every_flag(module, monkeypatch):
    parser, text = help_text(module, monkeypatch)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert flags and not [flag for flag in flags if flag not in text]


@pytest.mark.parametrize("module", COMMANDS)
def test_module_docstring_is_short(module, repo_dir):
    path = Path(repo_dir, *module.split(".")).with_suffix(".py")
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
    assert docstring and len(docstring.strip("\n").splitlines()) <= MAX_DOCSTRING_LINES


def test_compact_usage_names_the_required_flags_only(monkeypatch):
    """The long commands' usage line: the required flags with their kind of value, then ``[options]``."""
    _, text = help_text("adore.train", monkeypatch)
    usage = text.split("\n\n")[0]
    assert " ".join(usage.split()) == ("usage: python -m adore.train --init_path PATH --preprocess_dir DIR "
                                       "--pembed_path PATH --model_save_dir DIR [options]")
    assert "--per_gpu_batch_size N" in text and "--learning_rate X" in text and "(default: 5e-06)" in text


# Required arguments of the commands with aliases; the aliased flag is given last, by one name or the other.
ALIASES = [
    ("adore.train", ["--init_path", "m", "--preprocess_dir", "p", "--model_save_dir", "o"], "--pembed_path",
     "--doc_embeddings", ["e"]),
    ("adore.inference", ["--model_dir", "m", "--output_dir", "o", "--preprocess_dir", "p", "--mode", "dev"],
     "--dmemmap_path", "--doc_embeddings", ["e"]),
    ("adore.train", ["--init_path", "m", "--preprocess_dir", "p", "--model_save_dir", "o", "--pembed_path", "e"],
     "--faiss_gpu_index", "--faiss_gpus", ["0", "2"]),
]


@pytest.mark.parametrize("module, required, original, alias, values", ALIASES)
def test_an_alias_sets_what_the_original_flag_sets(module, required, original, alias, values):
    """``--doc_embeddings`` names the document embeddings in both ADORE commands and ``--faiss_gpus`` the faiss
    GPUs in every command that searches; the original names keep working."""
    parser = importlib.import_module(module).build_parser()
    by_original = parser.parse_args([*required, original, *values])
    by_alias = parser.parse_args([*required, alias, *values])
    assert vars(by_alias) == vars(by_original)
    dest = original.lstrip("-")
    assert getattr(by_alias, dest) == (values[0] if len(values) == 1 else [int(v) for v in values])
