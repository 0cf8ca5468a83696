"""What README.md promises, checked against the code: the two set-up commands (and .ci/run running the test one),
the `python -m` commands and their flags, reproduce.sh's tasks and documented knobs, and the tests the Guarantees
section names."""
import argparse
import importlib
import re
import shlex
import subprocess

import pytest


def _setup_commands(readme: str) -> list[str]:
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


@pytest.fixture(scope="module")
def readme(repo_dir) -> str:
    return (repo_dir / "README.md").read_text(encoding="utf-8")


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one(repo_dir, readme):
    commands = _setup_commands(readme)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "bash reproduce.sh sample" in demo
    assert "pytest" in tests
    ci_lines = [line for line in (repo_dir / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [tests]


def python_m_commands(readme: str) -> list[tuple[str, list[str]]]:
    """``(module, words after it)`` of every ``python -m MODULE ...`` in the README's inline code (pytest aside)."""
    found = []
    inline = re.sub(r"```.*?```", "", readme, flags=re.S)
    for code in re.findall(r"`([^`]+)`", inline):
        for match in re.finditer(r"python -m ([a-z_][\w.]*)((?:\s+[^\s|]+)*)", code):  # NAME: a placeholder
            if match.group(1) != "pytest":
                found.append((match.group(1), shlex.split(match.group(2))))
    return found


def parser_options(module: str) -> set[str]:
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    return {option for action in parser._actions for option in action.option_strings}


def test_every_readme_command_names_a_module_and_flags_that_exist(readme):
    commands = python_m_commands(readme)
    modules = {module for module, _ in commands}
    assert {"preprocess", "star.train", "star.prepare_hardneg", "star.inference", "adore.train", "adore.inference",
            "msmarco_eval", "cvt_back", "results_table"} <= modules, modules
    for module, words in commands:
        if module == "sample_data":  # the sample generator: imported to check it exists
            importlib.import_module(module)
            continue
        options = parser_options(module)
        flags = [w.split("=", 1)[0] for w in words if w.startswith("--")]
        unknown = [f for f in flags if f not in options]
        assert not unknown, f"README runs `python -m {module}` with flags it does not have: {unknown}"


def test_reproduce_tasks_and_knobs_are_the_documented_ones(repo_dir, readme):
    script = (repo_dir / "reproduce.sh").read_text(encoding="utf-8")
    help_text = subprocess.run(["bash", str(repo_dir / "reproduce.sh"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    readme_tasks = re.findall(r"^\| `([\w-]+)`(?: \(default\))? \|", readme, flags=re.M)
    assert readme_tasks == ["sample", "sample-doc", "passage", "doc"]
    accepted = re.search(r"^\s*([\w|-]+)\) ;;$", script, flags=re.M).group(1).split("|")
    assert accepted == readme_tasks
    knobs = set(re.findall(r"(?<!export )\b([A-Z][A-Z0-9_]*)=\$\{\1:?-", script))
    assert {"STEPS", "BATCH", "TOPK", "ADORE_EPOCHS", "METRIC_CUT", "CURVES"} <= knobs
    undocumented = sorted(k for k in knobs if not re.search(rf"\b{k}=", help_text))
    assert not undocumented, f"knobs missing from `bash reproduce.sh --help`: {undocumented}"


def test_every_test_the_guarantees_section_names_exists(repo_dir, readme):
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)", section))
    assert len(named) >= 20, named
    defined = set()
    for path in (repo_dir / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    assert not named - defined, f"the README names tests that do not exist: {sorted(named - defined)}"
    for path in re.findall(r"tests/(\w+\.py)", section):
        assert (repo_dir / "tests" / path).is_file(), path
