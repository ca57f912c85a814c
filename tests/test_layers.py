"""The package's parts import one way, and the top level holds only the commands:

    commands     vitexp/<command>.py, `python -m vitexp.<command>`: may import every part;
                 no module imports a command (tests may)
    analysis     vitexp/analysis/: training, the schema, data, models, errors
    training     vitexp/training/: the schema, data, models, errors (never analysis)
    config       vitexp/config.py, the schema: composes the parts' configs (data, models)
    data         vitexp/data/: errors only (it owns its configs, as models owns ViTConfig)
    models       vitexp/models/: nothing else of vitexp (copyable into other code)
    errors       vitexp/errors.py: nothing of vitexp

Checked on the source (every import statement, at a module's top or inside a function,
absolute or relative), and on what a fresh interpreter loads; and no import cycle exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vitexp"
PARTS = ("models", "data", "training", "analysis")
SHARED = ("config", "errors")  # the top level's modules that are not commands
NAME = r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*"  # a module path, without a final dot
# layer -> the layers its modules may import ("package": vitexp/__init__.py, the public API)
ALLOWED = {
    "models": {"models"},
    "data": {"data", "errors"},
    "errors": {"errors"},
    "config": {"config", "data", "models", "errors"},
    "training": {"training", "config", "data", "models", "errors"},
    "analysis": {"analysis", "training", "config", "data", "models", "errors"},
    "command": {"analysis", "training", "config", "data", "models", "errors", "package"},
    "package": {"training"},  # vitexp.load_model
}


def layer(module: str) -> str:
    """models | data | training | analysis | config | errors | package | command."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in PARTS or parts[1] in SHARED else "command"


def module_imports(root: Path = SRC) -> dict[str, set[str]]:
    """vitexp module -> the vitexp modules it imports, at its top or inside a function.

    `from P import a` counts as importing the module P.a where that is a module, else P;
    relative imports are resolved against the importing module's package."""
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in files.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..data import y
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    found.add(target if target in files else source)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes against the layers, as `importer -> imported (rule)`."""
    found = []
    for module, imported in sorted(graph.items()):
        mine = layer(module)
        for target in sorted(imported):
            theirs = layer(target)
            if theirs not in ALLOWED[mine]:
                found.append(f"{module} -> {target} ({mine} may not import {theirs})")
    return found


def test_each_part_imports_only_the_parts_below_it():
    bad = violations(module_imports())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_check_catches_every_kind_of_violation(tmp_path: Path):
    """The rules fail on a package that breaks each of them, wherever the import is."""
    sources = {
        "__init__.py": "",
        "errors.py": "",
        "config.py": "def f():\n    from vitexp.training.trainer import build_trainer\n",
        "train.py": "from . import report\n",  # a command importing a command, relatively
        "report.py": "def main():\n    pass\n",
        "models/__init__.py": "",
        "models/vit.py": "def f():\n    from vitexp.config import TrainConfig\n",
        "data/__init__.py": "",
        "data/sources.py": "from vitexp.errors import E\nfrom vitexp.training import rundir\n",
        "training/__init__.py": "",
        "training/rundir.py": "from ..data import sources\n",  # allowed
        "training/trainer.py": "import vitexp.analysis.tables\n",
        "analysis/__init__.py": "",
        "analysis/tables.py": "from vitexp import train\n",
    }
    for name, text in sources.items():
        path = tmp_path / "vitexp" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert violations(module_imports(tmp_path / "vitexp")) == [
        "vitexp.analysis.tables -> vitexp.train (analysis may not import command)",
        "vitexp.config -> vitexp.training.trainer (config may not import training)",
        "vitexp.data.sources -> vitexp.training.rundir (data may not import training)",
        "vitexp.models.vit -> vitexp.config (models may not import config)",
        "vitexp.train -> vitexp.report (command may not import command)",
        "vitexp.training.trainer -> vitexp.analysis.tables (training may not import analysis)",
    ]


def test_the_top_level_holds_only_commands():
    """Besides the schema and the errors, every module of vitexp/ is a command: it runs as
    `python -m vitexp.<name>` (a `main`, called under `__main__`)."""
    for path in sorted(SRC.glob("*.py")):
        if path.stem in ("__init__", *SHARED):
            continue
        text = path.read_text()
        assert "\ndef main(" in text and '\nif __name__ == "__main__":' in text, path.name


def test_every_command_the_docs_name_exists():
    """`python -m vitexp.X` in the README, the Makefile, the configs, CI and the tests runs
    a top-level command (never an internal path)."""
    texts = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / ".ci").rglob("*")]
    texts += [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "tests").glob("*.py")]
    named = set()
    for path in texts:
        if path.is_file():
            text = path.read_text()
            named |= set(re.findall(rf"-m vitexp\.({NAME})", text))
            named |= set(re.findall(rf"""["']-m["'],\s*["']vitexp\.({NAME})""", text))
    assert {"train", "fewshot", "report", "reproduce", "visualize"} <= named
    for command in sorted(named):
        assert (SRC / f"{command}.py").is_file(), f"python -m vitexp.{command}: no such command"


def loaded_by(module: str) -> set[str]:
    """Every module a fresh interpreter has loaded after `import module`."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("vitexp.models", ("lightning", "hydra", "omegaconf", "vitexp.")),
        ("vitexp.data.datamodule", ("vitexp.models", "vitexp.config", "vitexp.training")),
        ("vitexp.config", ("lightning", "vitexp.training", "vitexp.analysis")),
        ("vitexp.training.trainer", ("vitexp.analysis", "vitexp.train")),
        ("vitexp.fewshot", ("vitexp.train", "vitexp.training.trainer")),
        ("vitexp.visualize", ("vitexp.train", "vitexp.training.trainer")),
        ("vitexp.training.cli", ("vitexp.train", "lightning")),
    ],
)
def test_layers_import_one_way(module, forbidden):
    """What a fresh interpreter loads agrees: `vitexp.x` forbids that module and its
    submodules, `vitexp.` every module of vitexp but `module`'s own."""

    def hit(name: str, prefix: str) -> bool:
        if prefix.endswith("."):
            return name.startswith(prefix)
        return name == prefix or name.startswith(prefix + ".")

    loaded = loaded_by(module)
    own = module.rsplit(".", 1)[0] if module.count(".") > 1 else module
    bad = sorted(
        m for m in loaded if any(hit(m, f) for f in forbidden) and not hit(m, own) and m != "vitexp"
    )
    assert not bad, f"{module} loads {bad[:5]}"


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
