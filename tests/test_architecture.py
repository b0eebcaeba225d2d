"""Architecture is enforced, not hoped for: the layers (gui/cli > demo > session > core),
a Qt-free core and session model, and no module over 600 lines."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 3 kept, 0 broken" in proc.stdout


def test_core_imports_without_qt():
    code = (
        "import sys; import pivotmerge_gui.core.pipeline, pivotmerge_gui.core.methods as m; "
        "m.list_methods(); "
        "bad=[k for k in sys.modules if k.startswith(('PySide6','pyqtgraph'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


MAX_MODULE_LINES = 600


def test_no_module_of_the_package_is_over_600_lines():
    package = ROOT / "pivotmerge_gui"
    long = {str(p.relative_to(ROOT)): n for p in package.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
