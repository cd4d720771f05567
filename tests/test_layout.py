"""The package layout is the architecture: these rules keep it so.

- `model` imports neither training, inference nor jobs: a stage module is the same network whoever runs it.
- `training` and `inference` import nothing from each other; only `jobs` (and `demo`) sit above both.
- Hydra (`omegaconf`, `hydra`) is seen only in `jobs`: everything below takes plain values.
- No module grows past about 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pp_runtime"
LAYERS = ("model", "checkpoints", "distributed", "io", "inference", "training", "jobs", "demo")
FORBIDDEN = {  # package -> packages it must not import
    "model": {"checkpoints", "inference", "training", "jobs", "demo"},
    "checkpoints": {"inference", "training", "jobs"},
    "distributed": {"model", "checkpoints", "inference", "training", "jobs"},
    "io": {"model", "checkpoints", "inference", "training", "jobs"},
    "inference": {"training", "jobs"},
    "training": {"inference", "jobs"},
}
MAX_LINES = 520


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module an import statement names, also those inside functions (lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def test_every_module_lives_in_a_package_by_job():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "errors.py")]
    assert top == [], f"modules outside the job packages {LAYERS}: {top}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path):
    pkg = _package_of(path)
    bad = []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] in ("omegaconf", "hydra") and pkg != "jobs":
            bad.append(f"{name} (Hydra belongs to jobs/)")
        if parts[0] == "pp_runtime" and len(parts) > 1 and parts[1] in FORBIDDEN.get(pkg, ()):
            bad.append(f"{name} ({pkg}/ must not import {parts[1]}/)")
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(set(bad))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines; split it by job"
