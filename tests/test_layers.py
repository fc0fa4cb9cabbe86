"""lmforge's import layers (pyproject.toml's [tool.importlinter], docs/architecture.md): the tree keeps them, and
the check is not toothless: in a copy of the package, an upward import, a cycle or a module with no layer breaks it.

Run by the suite and by .ci/lint, so an import that points up a layer fails CI wherever it is written (imports
inside functions count)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter, pinned in requirements.txt


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package in `root` with the project's contracts."""
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)}  # the copy's lmforge, not the installed one
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "lmforge", tmp_path / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return tmp_path


def append(path: Path, code: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n\n" + code + "\n", encoding="utf-8")


def test_the_tree_keeps_its_layers_and_has_no_import_cycle():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(copy):
    append(
        copy / "lmforge" / "infer" / "generate.py",
        "def _load(path):\n    from lmforge.loader import load\n\n    return load(path)",
    )
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout
    assert "lmforge.infer.generate -> lmforge.loader" in result.stdout
    assert "0 kept, 2 broken" in result.stdout  # and a cycle of packages: the loader imports lmforge.infer
    assert "- .infer -> .loader (1 import)" in result.stdout


def test_a_cycle_between_sibling_modules_breaks_the_check(copy):
    append(copy / "lmforge" / "engine" / "scheduler.py", "from lmforge.engine import engine as _engine  # noqa")
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout
    assert "1 kept, 1 broken" in result.stdout  # the layers hold: the cycle is inside one of them
    assert "- .scheduler -> .engine (1 import)" in result.stdout


def test_a_new_module_must_be_given_a_layer(copy):
    (copy / "lmforge" / "newthing.py").write_text('"""Not placed in any layer yet."""\n', encoding="utf-8")
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout
    assert "lmforge.newthing" in result.stdout
