"""What README.md and the pages of docs/ promise, checked against the code: the two set-up commands (and .ci/run
running the test one), the README's length and its copy-paste blocks, the `python -m` commands and their flags,
reproduce.sh's tasks and knobs, download_data.sh's targets, the relative links, the flags glossary and the tests
docs/guarantees.md names."""
import argparse
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

COMMANDS = ["preprocess", "star.prepare_hardneg", "star.train", "star.inference", "adore.train", "adore.inference",
            "msmarco_eval", "cvt_back", "results_table", "export_sentence_transformers", "sample_data"]
README_MAX_LINES = 150


def _setup_commands(readme: str) -> list[str]:
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


@pytest.fixture(scope="module")
def readme(repo_dir) -> str:
    return (repo_dir / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pages(repo_dir) -> dict[Path, str]:
    """README.md and every docs/*.md, by path."""
    paths = [repo_dir / "README.md", *sorted((repo_dir / "docs").glob("*.md"))]
    return {path: path.read_text(encoding="utf-8") for path in paths}


@pytest.fixture(scope="module")
def reproduce_help(repo_dir) -> str:
    return subprocess.run(["bash", str(repo_dir / "reproduce.sh"), "--help"], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def download_help(repo_dir) -> str:
    return subprocess.run(["bash", str(repo_dir / "download_data.sh"), "--help"], capture_output=True, text=True,
                          check=True).stdout


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one(repo_dir, readme):
    commands = _setup_commands(readme)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "bash reproduce.sh sample" in demo
    assert "pytest" in tests
    ci_lines = [line for line in (repo_dir / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [tests]


def test_readme_is_at_most_150_lines(readme):
    assert len(readme.splitlines()) <= README_MAX_LINES


def python_m_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, words after it)`` of every ``python -m MODULE ...`` in a page's inline code (pytest aside)."""
    found = []
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    for code in re.findall(r"`([^`]+)`", inline):
        for match in re.finditer(r"python -m ([a-z_][\w.]*)((?:\s+[^\s|]+)*)", code):  # NAME: a placeholder
            if match.group(1) != "pytest":
                found.append((match.group(1), shlex.split(match.group(2))))
    return found


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def simple_commands(block: str) -> list[list[str]]:
    """The words of each command of a bash block: continuation lines joined, comments dropped, split at ``&&``,
    ``;`` and ``|``."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in lexer:
            if word in ("&&", ";", "|", "||"):
                commands.append(words)
                words = []
            else:
                words.append(word)
        commands.append(words)
    return [words for words in commands if words]


def parser_options(module: str) -> set[str]:
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    return {option for action in parser._actions for option in action.option_strings}


def unknown_flags(module: str, words: list[str]) -> list[str]:
    if module == "sample_data" and not words:  # the sample generator named without flags: it must exist
        importlib.import_module(module)
        return []
    options = parser_options(module)
    return [flag for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")) if flag not in options]


def reproduce_tasks(repo_dir: Path) -> list[str]:
    """The tasks of reproduce.sh's first ``case $TASK in`` (what it accepts; ``--help`` aside)."""
    script = (repo_dir / "reproduce.sh").read_text(encoding="utf-8")
    block = re.search(r"^case \$TASK in\n(.*?)^esac", script, flags=re.M | re.S).group(1)
    patterns = re.findall(r"^\s*([^\s()]+)\)", block, flags=re.M)
    return [task for pattern in patterns for task in pattern.split("|") if task not in ("-h", "--help", "*")]


def download_targets(repo_dir: Path) -> set[str]:
    """The words download_data.sh's ``case`` patterns accept."""
    script = (repo_dir / "download_data.sh").read_text(encoding="utf-8")
    return {word for pattern in re.findall(r"^\s*([\w|-]+)\)", script, flags=re.M) for word in pattern.split("|")}


def reproduce_knobs(repo_dir: Path) -> set[str]:
    script = (repo_dir / "reproduce.sh").read_text(encoding="utf-8")
    return set(re.findall(r"(?<!export )\b([A-Z][A-Z0-9_]*)=\$\{\1:?-", script))


SETUP_WORDS = {"pip", ".", "source"}


def split_env(words: list[str]) -> tuple[list[str], list[str]]:
    """The names a command's leading ``NAME=value`` words set, and the command after them."""
    names = []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        names.append(words[0].split("=", 1)[0])
        words = words[1:]
    return names, words


def command_problems(words: list[str], repo_dir: Path, reproduce_help: str, download_help: str) -> list[str]:
    """Why a bash command of the docs would not run as written: an unknown script, task, target, module, flag or
    knob (empty when it would).  Set-up commands (venv, pip, activate, pytest) pass."""
    env, words = split_env(words)
    program, args = words[0], words[1:]
    if program in SETUP_WORDS or (program.startswith("python") and args[:2] in (["-m", "venv"], ["-m", "pytest"])):
        return []
    if program.startswith("python") or program == "torchrun":
        if "-m" not in args:
            return [] if (repo_dir / args[0]).is_file() else [f"no script {args[0]}"]
        at = args.index("-m")
        module, flags = args[at + 1], args[at + 2:]
        if module not in COMMANDS:
            return [f"no command {module}"]
        return [f"{module} has no flag {flag}" for flag in unknown_flags(module, flags)]
    if program != "bash" or not (repo_dir / args[0]).is_file():
        return [f"not a project command: {' '.join(words)}"]
    script, rest = args[0], args[1:]
    if script == "reproduce.sh":
        problems = [f"reproduce.sh has no task {task}" for task in rest[:1] if task not in reproduce_tasks(repo_dir)]
        problems += [f"reproduce.sh --help does not name the knob {name}" for name in env
                     if not re.search(rf"\b{name}\b", reproduce_help)]
        return problems
    if script == "download_data.sh":
        targets = download_targets(repo_dir)
        words_before_flags = rest[:next((i for i, word in enumerate(rest) if word.startswith("-")), len(rest))]
        return [f"download_data.sh does not take {word}" for word in words_before_flags
                if word not in targets or not re.search(rf"\b{word}\b", download_help)]
    return []


def test_every_readme_block_is_a_setup_command_or_a_command_that_exists(repo_dir, readme, reproduce_help,
                                                                         download_help):
    commands = [words for block in bash_blocks(readme) for words in simple_commands(block)]
    problems = [p for words in commands for p in command_problems(words, repo_dir, reproduce_help, download_help)]
    assert not problems, problems
    runs = [split_env(words)[1] for words in commands]
    tasks = {words[2] for words in runs if words[:2] == ["bash", "reproduce.sh"] and len(words) > 2}
    assert {"sample", "released-passage", "passage", "beir"} <= tasks, tasks  # the three paths


def test_every_documented_command_names_a_module_and_flags_that_exist(repo_dir, pages, reproduce_help,
                                                                      download_help):
    commands = [(page, module, words) for page, text in pages.items() for module, words in python_m_commands(text)]
    assert {"preprocess", "star.train", "star.prepare_hardneg", "star.inference", "adore.train", "adore.inference",
            "msmarco_eval", "cvt_back", "results_table"} <= {module for _, module, _ in commands}
    problems = [f"{page.name}: `python -m {module}` has no flag {flag}" for page, module, words in commands
                for flag in unknown_flags(module, words)]
    for page, text in pages.items():
        problems += [f"{page.name}: {p}" for block in bash_blocks(text) for words in simple_commands(block)
                     for p in command_problems(words, repo_dir, reproduce_help, download_help)]
    assert not problems, problems


def test_reproduce_tasks_and_knobs_are_the_documented_ones(repo_dir, pages, reproduce_help):
    accepted = reproduce_tasks(repo_dir)
    assert {"sample", "sample-doc", "passage", "doc"} <= set(accepted), accepted
    tasks_section = pages[repo_dir / "docs" / "pipeline.md"].split("## Tasks", 1)[1].split("\n## ", 1)[0]
    tabled = [task for row in re.findall(r"^\| ([^|]+) \|", tasks_section, flags=re.M)
              for task in re.findall(r"`([\w-]+)`", row)]
    assert sorted(tabled) == sorted(accepted), "docs/pipeline.md's task table and reproduce.sh's tasks differ"
    named = {task for text in pages.values() for task in re.findall(r"reproduce\.sh ([a-z][\w-]*)", text)}
    assert not named - set(accepted), f"the docs run reproduce.sh tasks it lacks: {sorted(named - set(accepted))}"
    knobs = reproduce_knobs(repo_dir)
    assert {"STEPS", "BATCH", "TOPK", "ADORE_EPOCHS", "METRIC_CUT", "CURVES"} <= knobs
    undocumented = sorted(k for k in knobs if not re.search(rf"\b{k}=", reproduce_help))
    assert not undocumented, f"knobs missing from `bash reproduce.sh --help`: {undocumented}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)}


def test_every_relative_link_and_named_file_exists(repo_dir, pages):
    broken = []
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text("utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
        for named in re.findall(r"\b((?:benchmarks|tests|infra|star|adore)/[\w/]+\.(?:py|sh))", text):
            if not (repo_dir / named).is_file():
                broken.append(f"{page.name}: {named}")
    assert not broken, broken


def test_the_docs_index_lists_every_page(repo_dir, pages):
    index = pages[repo_dir / "docs" / "index.md"]
    listed = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    on_disk = {page.name for page in pages if page.parent.name == "docs"} - {"index.md"}
    assert on_disk <= listed, sorted(on_disk - listed)


def glossary_rows(text: str) -> list[tuple[str, list[str]]]:
    """``(command, flags)`` of each row of docs/flags.md's tables: a command in the first column, its flags in
    the second."""
    return [(command, re.findall(r"--[\w-]+", cell))
            for command, cell in re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", text, flags=re.M)]


def test_the_flags_glossary_names_only_flags_of_the_named_command(repo_dir, pages):
    rows = glossary_rows(pages[repo_dir / "docs" / "flags.md"])
    pairs = {(command, flag) for command, flags in rows for flag in flags}
    assert {("adore.train", "--pembed_path"), ("adore.inference", "--dmemmap_path"), ("star.inference", "--faiss_gpus"),
            ("adore.train", "--faiss_gpu_index"), ("star.prepare_hardneg", "--not_faiss_cuda"),
            ("star.train", "--init_path"), ("star.inference", "--model_dir"), ("preprocess", "--data_type"),
            ("adore.train", "--max_seq_length")} <= pairs
    assert all(flags for _, flags in rows), rows
    unknown = sorted((command, flag) for command, flag in pairs
                     if command not in COMMANDS or flag not in parser_options(command))
    assert not unknown, f"docs/flags.md names flags the command does not have: {unknown}"


def test_every_test_the_guarantees_page_names_exists(repo_dir, pages):
    page = pages[repo_dir / "docs" / "guarantees.md"]
    named = set(re.findall(r"`(test_\w+)", page))
    assert len(named) >= 20, named
    defined = set()
    for path in (repo_dir / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    assert not named - defined, f"docs/guarantees.md names tests that do not exist: {sorted(named - defined)}"
