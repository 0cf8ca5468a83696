"""The code's structure, checked: the layers are folders — ``infra/`` (infrastructure, knows no model) under the
pipeline's stage modules at the top, under the drivers in ``star/`` and ``adore/``, under the user-facing tools —
and nothing imports upward, no import cycle, every module opens with a docstring naming its concept and stays
under 800 lines.  The top level holds only the user's files, the tools and the one package."""
import ast
import subprocess
from pathlib import Path

import pytest

# The pipeline, lowest layer first (docs/pipeline.md, "Code layout").
STAGES = ["preprocess", "dataset", "model", "retrieve_utils"]
DRIVERS = ["star.prepare_hardneg", "star.train", "star.inference", "adore.train", "adore.inference"]
TOOLS = ["msmarco_eval", "cvt_back", "results_table", "export_sentence_transformers", "sample_data"]
TOP_LEVEL_FILES = {"setup.py", "download_data.sh", "reproduce.sh", "README.md", *(f"{m}.py" for m in STAGES + TOOLS)}
TOP_LEVEL_FOLDERS = {"infra", "star", "adore", "tests", "benchmarks", "docs"}
MAX_LINES = 800


def infra_modules(repo: Path) -> list[str]:
    return sorted(f"infra.{p.stem}" for p in (repo / "infra").glob("*.py") if p.stem != "__init__")


def layers(repo: Path) -> dict[str, int]:
    """Module → layer: infra 0, the stages 1..4 in pipeline order, drivers 5, tools 6."""
    layer = {module: 0 for module in infra_modules(repo)}
    layer.update({module: 1 + i for i, module in enumerate(STAGES)})
    layer.update({module: 1 + len(STAGES) for module in DRIVERS})
    layer.update({module: 2 + len(STAGES) for module in TOOLS})
    return layer


def module_path(repo: Path, module: str) -> Path:
    return repo / (module.replace(".", "/") + ".py")


def project_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_top_level_holds_only_the_users_files_the_tools_and_one_package(repo_dir):
    if not (repo_dir / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files"], cwd=repo_dir, capture_output=True, text=True, check=True).stdout
    tops = {line.split("/")[0] + ("/" if "/" in line else "") for line in listed.splitlines() if line}
    tops = {name for name in tops if not name.startswith(".")}
    files = {name for name in tops if not name.endswith("/")}
    folders = {name[:-1] for name in tops if name.endswith("/")}
    assert files == TOP_LEVEL_FILES, (files - TOP_LEVEL_FILES, TOP_LEVEL_FILES - files)
    assert folders == TOP_LEVEL_FOLDERS, (folders - TOP_LEVEL_FOLDERS, TOP_LEVEL_FOLDERS - folders)


def test_every_project_module_has_a_layer(repo_dir):
    on_disk = {p.stem for p in repo_dir.glob("*.py") if p.name != "setup.py"}
    on_disk |= {f"{p.parent.name}.{p.stem}" for p in (*repo_dir.glob("star/*.py"), *repo_dir.glob("adore/*.py"))
                if p.stem != "__init__"}
    on_disk |= set(infra_modules(repo_dir))
    assert on_disk == set(layers(repo_dir)), (on_disk - set(layers(repo_dir)), set(layers(repo_dir)) - on_disk)


def test_modules_import_nothing_above_their_layer(repo_dir):
    layer = layers(repo_dir)
    upward = {module: {imported for imported in project_imports(module_path(repo_dir, module), set(layer))
                       if layer[imported] > layer[module]} for module in layer}
    assert not {m: up for m, up in upward.items() if up}


def test_no_module_only_re_exports(repo_dir):
    """A module whose body is imports, ``__all__`` and a docstring would only hide where names live."""
    for module in layers(repo_dir):
        body = ast.parse(module_path(repo_dir, module).read_text(encoding="utf-8")).body
        own = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))
               and not (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets))]
        assert own, f"{module} only re-exports"


def test_no_import_cycle(repo_dir):
    layer = layers(repo_dir)
    graph = {module: project_imports(module_path(repo_dir, module), set(layer)) - {module} for module in layer}
    done, active = set(), []

    def visit(module: str) -> None:
        assert module not in active, f"import cycle: {' -> '.join(active[active.index(module):] + [module])}"
        if module in done:
            return
        active.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_modules_are_short_and_open_with_their_concept(repo_dir):
    for module in layers(repo_dir):
        text = module_path(repo_dir, module).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= MAX_LINES, f"{module} has {len(text.splitlines())} lines"
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring and len(docstring.split()) >= 5, f"{module} has no opening docstring naming its concept"
