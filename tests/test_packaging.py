"""The installed layout: kernels/ is uniter_fast.kernels, and never a top-level `kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_top_level_kernels_module_from_repo_root():
    # train.py is imported as a module (its main() is not run) with the package and every
    # subpackage; none of it may put a module named `kernels` in sys.modules.
    code = (
        "import sys, uniter_fast, uniter_fast.kernels, uniter_fast.train, uniter_fast.authors, "
        "uniter_fast.convert, uniter_fast.data.pipeline, uniter_fast.data.synthetic, train\n"
        "print(sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')))\n"
        "print(uniter_fast.kernels.__file__)"
    )
    bad, kernels_file = _run(code, REPO).splitlines()
    assert bad == "[]"
    assert Path(kernels_file) == REPO / "kernels" / "__init__.py"


def test_package_imports_from_elsewhere(tmp_path):
    # Outside the repository only the installed (editable) package can be found.
    out = _run("import uniter_fast, uniter_fast.kernels as k; print(k.__name__)", tmp_path)
    assert out == "uniter_fast.kernels"


def test_triton_probe_is_consistent():
    from uniter_fast import kernels

    assert kernels.triton_runs_on("cuda") == kernels.triton_importable()
    assert not kernels.triton_runs_on("mps")
