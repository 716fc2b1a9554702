"""The house: imports go one way between the stage packages, no circle anywhere, no work at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "finetune"
# Lower floors may be imported by higher ones, never the other way; one floor holds siblings that do not import each other.
FLOORS = {
    "finetune.errors": 0,
    "finetune.commands": 0,
    "finetune.bars": 0,
    "finetune.files": 1,
    "finetune.versions": 1,
    "finetune.run_dir": 2,
    "finetune.config": 3,
    "finetune.data": 4,
    "finetune.models": 4,
    "finetune.inference": 5,
    "finetune.training": 6,
    "finetune.evaluation": 6,
    "finetune.reporting": 7,
    "finetune.deploy": 7,
    "finetune.server": 8,
    "finetune.runs": 9,
    "finetune.api": 10,
    "finetune.cli": 11,
    "finetune.__main__": 12,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every finetune module this file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("finetune"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: (_imports(path) & set(modules)) - {name} for name, path in modules.items()}


def _floor(module: str) -> tuple[str, int]:
    if module == "finetune":  # the package's face: __version__ and the lazy API
        return module, 0
    for prefix, floor in sorted(FLOORS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, floor
    raise AssertionError(f"{module} is on no floor of the house; add its package to FLOORS")


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_imports_only_go_down_the_stages():
    wrong = []
    for module, targets in _graph().items():
        if module == "finetune":  # the package's face re-exports lazily
            continue
        home, floor = _floor(module)
        for target in targets:
            target_home, target_floor = _floor(target)
            if target_home != home and target_floor >= floor:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not go down: " + ", ".join(sorted(wrong))


def test_the_catalog_imports_nothing_else_from_finetune():
    assert _graph()["finetune.config.catalog"] == set()


def test_modules_and_functions_are_short():
    long_functions, long_modules = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            long_modules.append(str(path))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_importing_finetune_changes_no_global_state():
    """No matplotlib backend switch, no torch import for `finetune --help`, nothing else at import time."""
    code = """
import importlib, pkgutil, sys
import matplotlib
matplotlib.use("svg")  # anything but Agg: a module that calls matplotlib.use("Agg") would change it
import finetune
assert "torch" not in sys.modules, "import finetune must stay light (lazy API)"
for info in pkgutil.walk_packages(finetune.__path__, "finetune."):
    if info.name != "finetune.__main__":
        importlib.import_module(info.name)
import numpy as np
from finetune.inference.predictions import Predictions
from finetune.reporting.report import write_report
probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
write_report(Predictions(paths=["a", "b", "c"], probs=probs, targets=np.array([0, 1, 1])), ["x", "y"], __import__("pathlib").Path(sys.argv[1]), top_k=1, title="t")
print(matplotlib.get_backend())
"""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "svg"
        assert (Path(folder) / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_one_list_of_commands_drives_the_api_the_lazy_names_and_the_cli():
    import typer

    import finetune
    from finetune import api
    from finetune.cli import app
    from finetune.commands import COMMANDS, OTHER_NAMES

    listed = {name for command in COMMANDS for name in (command.name, *command.results)} | set(OTHER_NAMES)
    assert set(api.__all__) == listed
    assert set(finetune._LAZY) == listed and set(finetune.__all__) == listed | {"FinetuneError", "__version__"}
    for command in COMMANDS:
        function = getattr(api, command.name)
        assert function.__module__ == command.module, command
        assert all(p.kind is p.KEYWORD_ONLY for p in __import__("inspect").signature(function).parameters.values()) or (
            command.name == "load"
        ), f"{command.name} takes keyword-only arguments"
    group = typer.main.get_command(app)
    cli_names = set(group.commands)  # type: ignore[attr-defined]
    wanted = {command.cli.split()[0] for command in COMMANDS if command.cli}
    assert cli_names == wanted, (cli_names, wanted)
    assert "diff" in group.commands["report"].commands  # type: ignore[attr-defined]
    assert "--folds" in {opt for param in group.commands["train"].params for opt in param.opts}  # type: ignore[attr-defined]


def test_no_command_module_imports_a_helper_of_another_command():
    """Commands call each other's command functions (and take their result types), never their helpers."""
    from finetune.commands import COMMANDS

    offered = {(c.module, name) for c in COMMANDS for name in (c.name, *c.results)}
    borrowed = []
    for path in (PACKAGE / "runs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune.runs."):
                if node.module == "finetune.runs.prepare":
                    continue  # shared setup, one floor of its own
                borrowed += [f"{path.name}: {node.module}.{a.name}" for a in node.names if (node.module, a.name) not in offered]
    assert not borrowed, borrowed
