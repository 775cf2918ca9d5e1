"""Every module under tests/ imports, whatever tier it belongs to.

Why: ``mypy`` checks the files pyproject.toml's ``[tool.mypy]`` lists (the production packages
and tools, not tests/), and a run imports only the modules it collects (a developer runs the
unit tier and the files touched). A privileged, lab or vm module whose import broke (a renamed
helper, a moved constant) went unnoticed until the root CI job collected it. Importing every
module here, in this process with :mod:`importlib`, finds that in the unit tier without running
any test (about 2 s of imports; 10 s under pytest when bytecode is not cached, since pytest
rewrites each test module's asserts as it imports it).

Importing is safe: the module bodies under tests/ only define tests, fixtures, helpers and
constants (read through when this test was written: none starts a process, touches the kernel
or needs root at import; the scripts some of them run in namespaces are string constants).
A module that skips itself at import (``pytest.importorskip`` of an optional dependency) counts
as importable: that is a choice, not a broken import.

Modules are imported under their package names (``tests.privileged.kernelns``), as the tests
import each other's helpers; the repository root is on ``sys.path`` (the editable install).
"""

from __future__ import annotations

import importlib
import sys
import traceback
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def import_all(root: Path, top: Path) -> tuple[list[str], list[str], list[str]]:
    """Import every ``*.py`` under ``root`` as the module named by its path below ``top``.

    Returns ``(imported, broken, skipped)``: module names, ``name: error`` for each module whose
    import raised, ``name: reason`` for each that skipped itself."""
    imported: list[str] = []
    broken: list[str] = []
    skipped: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(top).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            importlib.import_module(name)
        except pytest.skip.Exception as e:
            skipped.append(f"{name}: {e}")
        except (Exception, SystemExit) as e:  # every failure is a finding
            where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
            at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
            broken.append(f"{name}: {''.join(traceback.format_exception_only(e)).strip()}{at}")
        else:
            imported.append(name)
    return imported, broken, skipped


def test_every_test_module_imports() -> None:
    imported, broken, _skipped = import_all(REPO / "tests", REPO)
    assert not broken, "test modules whose import fails:\n" + "\n".join(broken)
    # Not vacuous: the tiers mypy does not check are among them.
    tiers = {name.split(".")[1] for name in imported if name.count(".") >= 2}
    assert {"unit", "privileged", "lab"} <= tiers, sorted(tiers)


def test_a_broken_import_is_reported_and_an_import_time_skip_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = f"kft_import_probe_{uuid.uuid4().hex[:8]}"
    tier = tmp_path / pkg / "privileged"
    tier.mkdir(parents=True)
    (tier / "helpers.py").write_text("VALUE = 1\n")
    (tier / "test_ok.py").write_text(f"from {pkg}.privileged.helpers import VALUE\n")
    (tier / "test_renamed.py").write_text("from fabric.control.planner import _NoSuchThing  # noqa\n")
    (tier / "test_moved.py").write_text(f"from {pkg}.privileged.helpers import GONE  # noqa\n")
    (tier / "test_syntax.py").write_text("def broken(:\n")
    (tier / "test_optional.py").write_text("import pytest\npytest.importorskip('kft_no_such_module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        imported, broken, skipped = import_all(tmp_path / pkg, tmp_path)
    finally:
        for name in [m for m in sys.modules if m.startswith(pkg)]:
            del sys.modules[name]
    assert imported == [f"{pkg}.privileged.helpers", f"{pkg}.privileged.test_ok"]
    assert [b.partition(":")[0] for b in broken] == [f"{pkg}.privileged.test_{m}"
                                                     for m in ("moved", "renamed", "syntax")]
    assert "cannot import name 'GONE'" in broken[0] and "_NoSuchThing" in broken[1]
    assert "SyntaxError" in broken[2] and "test_syntax.py" in broken[2]
    assert [s.partition(":")[0] for s in skipped] == [f"{pkg}.privileged.test_optional"]
