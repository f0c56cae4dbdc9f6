"""The package keeps one concern per module, and imports flow one way: no module imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_evalguard

PACKAGE = Path(lightning_evalguard.__file__).parent

#: Top to bottom. A module may import modules of its own level or below, never above.
LEVELS: list[set[str]] = [
    {"__init__", "__main__", "pytorch_lightning", "report"},
    {"callback"},
    {"passes"},
    {"sources", "cache"},
    {"sampling", "guards", "reference"},
    {
        "distributed",
        "results",
        "samples",
        "isolation",
        "metrics",
        "arguments",
        "summary",
        "progress",
        "errors",
        "forward",
        "_lightning",
    },
]


def level(module: str) -> int:
    return next(index for index, names in enumerate(LEVELS) if module in names)


def package_imports(path: Path) -> set[str]:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_evalguard."):
            imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lightning_evalguard."))
    return imported


def test_every_module_has_a_level():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set().union(*LEVELS)


def test_no_module_imports_one_above_it():
    upward = [
        (path.stem, imported)
        for path in PACKAGE.glob("*.py")
        for imported in package_imports(path)
        if level(imported) < level(path.stem)
    ]
    assert upward == []


def test_only_the_distributed_module_makes_collectives():
    calls = ("torch.distributed.broadcast", "reduce_boolean_decision", "strategy.reduce(", "strategy.broadcast(")
    found = [
        (path.stem, call)
        for path in PACKAGE.glob("*.py")
        if path.stem != "distributed"
        for call in calls
        if call in path.read_text()
    ]
    assert found == []
