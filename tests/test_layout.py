"""The code's structure, checked: every module of the project sits in a layer of the pipeline and imports only its
own or lower layers (nothing imports upward, no import cycle), opens with a docstring naming its concept, and stays
under 800 lines."""
import ast
from pathlib import Path

import pytest

# The pipeline, lowest layer first (README "Code layout").
LAYERS = [
    ["io_utils", "cli_types"],
    ["beir_input", "preprocess"],
    ["run_file", "dataset"],
    ["model", "losses"],
    ["embedding_memmap", "exact_search", "dist_utils", "encoding_plan", "corpus_encoding", "training_index",
     "inference_pipeline", "retrieve_utils"],
    ["optim_utils", "batch_plan", "checkpoint_paths", "checkpoint_utils", "train_utils"],
    ["sample_data", "star.prepare_hardneg", "star.train", "star.inference", "adore.train", "adore.inference",
     "export_sentence_transformers"],
    ["msmarco_eval", "cvt_back", "results_table"],
]
LAYER = {module: level for level, modules in enumerate(LAYERS) for module in modules}
MAX_LINES = 800


def module_path(repo: Path, module: str) -> Path:
    return repo / (module.replace(".", "/") + ".py")


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in LAYER}
    return found


def test_every_project_module_has_a_layer(repo_dir):
    on_disk = {p.stem for p in repo_dir.glob("*.py") if p.name != "setup.py"}
    on_disk |= {f"{p.parent.name}.{p.stem}" for p in (*repo_dir.glob("star/*.py"), *repo_dir.glob("adore/*.py"))
                if p.stem != "__init__"}
    assert on_disk == set(LAYER), (on_disk - set(LAYER), set(LAYER) - on_disk)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_module_imports_nothing_above_its_layer(repo_dir, module):
    upward = {imported for imported in project_imports(module_path(repo_dir, module))
              if LAYER[imported] > LAYER[module]}
    assert not upward, f"{module} (layer {LAYER[module]}) imports {upward} from a higher layer"


def test_no_import_cycle(repo_dir):
    graph = {module: project_imports(module_path(repo_dir, module)) - {module} for module in LAYER}
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


@pytest.mark.parametrize("module", sorted(LAYER))
def test_module_is_short_and_opens_with_its_concept(repo_dir, module):
    text = module_path(repo_dir, module).read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{module} has {len(text.splitlines())} lines"
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring and len(docstring.split()) >= 5, f"{module} has no opening docstring naming its concept"
