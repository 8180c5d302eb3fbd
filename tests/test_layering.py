"""The package's layering (CONTRIBUTING.md): which rooms may import which, checked on every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlab"
LOOPS = {"vitlab.train.classify", "vitlab.train.pretrain", "vitlab.train.cyclegan"}  # stability and sweep drive loops


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every vitlab module `path` imports, at any depth of the file (deferred imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "vitlab"}


MODULES = {module_name(path): imports(path) for path in sorted(SRC.rglob("*.py"))}


def room(module: str) -> str:
    """The first-level package (or module) a vitlab module belongs to."""
    return module.split(".")[1] if module.count(".") else ""


def offending(module: str, allowed: set[str]) -> list[str]:
    return sorted(name for name in MODULES[module] if name in MODULES and room(name) not in allowed | {room(module)})


@pytest.mark.parametrize("module", [m for m in MODULES if room(m) in {"config", "errors", "safe_pickle"}])
def test_config_and_errors_are_leaves(module: str) -> None:
    assert offending(module, {"errors"}) == []


@pytest.mark.parametrize("module", [m for m in MODULES if room(m) == "models"])
def test_models_import_no_data_train_eval_or_runs(module: str) -> None:
    assert offending(module, {"errors", "safe_pickle", "config"}) == []


@pytest.mark.parametrize("module", [m for m in MODULES if room(m) == "runtime"])
def test_the_runtime_imports_only_errors(module: str) -> None:
    assert offending(module, {"errors", "config"}) == []


@pytest.mark.parametrize("module", [m for m in MODULES if room(m) in {"data", "runs"}])
def test_data_and_runs_never_import_train_eval_or_the_cli(module: str) -> None:
    forbidden = {"train", "eval", "inspection", "cli", "sweep", "report"}
    assert sorted(name for name in MODULES[module] if name in MODULES and room(name) in forbidden) == []


@pytest.mark.parametrize("module", [m for m in MODULES if room(m) in {"eval", "inspection"}])
def test_eval_and_inspect_never_import_train(module: str) -> None:
    assert sorted(name for name in MODULES[module] if name in MODULES and room(name) in {"train", "cli", "sweep"}) == []


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_no_loop_imports_another_loop(loop: str) -> None:
    assert sorted(MODULES[loop] & (LOOPS - {loop})) == []


def test_nothing_but_the_entry_points_imports_the_cli() -> None:
    assert sorted(m for m, names in MODULES.items() if "vitlab.cli" in names) == []


def torch_imports(path: Path) -> set[str]:
    """Every torch module or name `path` imports (`from torch.x import y` counts as `torch.x.y`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "torch"}


def test_no_module_imports_a_private_part_of_torch() -> None:
    """torch's `_private` modules change without notice: use the public API or own the few lines."""
    private = {
        f"{module_name(path)}: {name}"
        for path in sorted(SRC.rglob("*.py"))
        for name in torch_imports(path)
        if any(part.startswith("_") for part in name.split("."))
    }
    assert sorted(private) == []
