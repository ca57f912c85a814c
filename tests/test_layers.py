"""The package's layers import one way: models stand alone (copyable into other code),
data never loads the models, the evaluation commands never load the training entry
point, and no module imports back into one that imports it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitexp"


def loaded_by(module: str) -> set[str]:
    """Every module a fresh interpreter has loaded after `import module`."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("vitexp.models", ("lightning", "hydra", "omegaconf", "vitexp.")),
        ("vitexp.data", ("vitexp.models",)),
        ("vitexp.fewshot", ("vitexp.train", "vitexp.training.trainer")),
        ("vitexp.visualize", ("vitexp.train", "vitexp.training.trainer")),
        ("vitexp.training.cli", ("vitexp.train",)),
    ],
)
def test_layers_import_one_way(module, forbidden):
    loaded = loaded_by(module)
    bad = sorted(
        m for m in loaded if m.startswith(forbidden) and not m.startswith(module) and m != "vitexp"
    )
    assert not bad, f"{module} loads {bad[:5]}"


def module_imports() -> dict[str, set[str]]:
    """vitexp module -> the vitexp modules it imports, at its top or inside a function."""
    graph = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("vitexp")
            ):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("vitexp")}
        graph[name] = found
    return {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}


def test_no_import_cycle():
    graph = module_imports()
    # a package's __init__ importing its own submodules is not a cycle
    edges = {k: {m for m in v if not m.startswith(k + ".")} for k, v in graph.items()}
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(edges[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    assert "vitexp.train" not in graph["vitexp.training.cli"]
