"""model/ is split by concern, with one-way imports between its packages and no Prefect anywhere in it."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "model"
ALLOWED = {  # package -> the other model packages it may import (as each package's docstring says)
    "data": {"store"},  # a damaged shard is named with the stage that remakes it
    "store": set(),
    "network": {"data", "store"},
    "training": {"network", "data"},
    "generation": {"network", "data"},
    "report": {"training", "network", "data"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_each_package_says_what_it_may_import_and_keeps_to_it():
    packages = sorted(p.name for p in MODEL.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(ALLOWED)
    assert not [p.name for p in MODEL.glob("*.py") if p.name != "__init__.py"], "modules belong in a package by concern"
    problems = []
    for package, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((MODEL / package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import" in doc, package
        for path in (MODEL / package).glob("*.py"):
            for name in imports(path):
                parts = name.split(".")
                if parts[0] == "prefect" or parts[0] in ("flows", "tasks"):
                    problems.append(f"{path.relative_to(MODEL)} imports {name}")
                elif parts[0] == "model" and len(parts) > 1 and parts[1] != package and parts[1] not in allowed:
                    problems.append(f"{path.relative_to(MODEL)} imports {name}; {package} may import {sorted(allowed) or 'nothing'}")
    assert not problems, problems
