"""The package's folders are the stages a trial's data passes through (data -> trial -> sweep -> results): each stage
imports only the stages before it and the shared base modules, so the layout says how the data flows."""

import ast
from pathlib import Path

import densetune

PACKAGE = Path(densetune.__file__).parent
STAGES = ("data", "trial", "sweep", "results")
BASE = ("config", "files", "storage", "cluster")  # used by every stage; they import no stage
ON_TOP = ("experiment", "tuning", "report", "evaluate", "export")  # the studies' command lines: they may import every stage
# The one import against the flow, kept so that run_sweep's result stays what it was: the trials it recorded and their
# summary table, read back through the results stage once the sweep has ended (inside run_sweep, never by a trial).
READS_BACK = {("sweep/tune.py", "results")}


def imported_parts(path: Path) -> set[str]:
    """The first part under densetune of every module `path` imports (relative imports resolved)."""
    module = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module[: len(module) - node.level]
            parts = (*base, *(node.module.split(".") if node.module else ()))
            found.update([parts[0]] if parts else [alias.name for alias in node.names])
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found.update(n.split(".")[1] for n in names if n and n.startswith("densetune.") and n.count("."))
    return found


def test_every_module_belongs_to_a_stage_the_base_or_the_top():
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top_level == set(BASE) | set(ON_TOP)
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES)


def test_each_stage_imports_only_the_stages_before_it():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            if path.stem in BASE:
                wrong += [f"{path.name} imports {p}" for p in imported_parts(path) if p in STAGES]
            continue
        if path.name == "__main__.py":  # a stage's command line may read what later stages keep
            continue
        allowed = STAGES[: STAGES.index(parts[0]) + 1]
        module = "/".join(parts)
        wrong += [
            f"{module} imports {p}" for p in imported_parts(path)
            if p not in allowed and p not in BASE and (module, p) not in READS_BACK
        ]
    assert not wrong, "\n".join(sorted(wrong))
