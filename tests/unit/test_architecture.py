"""The code's shape, checked: the import contracts in pyproject.toml ([tool.importlinter]: layers pointing
down, the guest sharing only the protocol with the host) and modules small enough to read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "polydev"
MAX_LINES = 450  # a module that grows past this does more than one thing: split it by job


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept.group(1)) >= 3, result.stdout[-2000:]  # the contracts were read and checked


def test_no_module_is_over_the_size_limit() -> None:
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue  # generated one per schema change, never read as a whole
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_long[str(path.relative_to(ROOT))] = lines
    assert too_long == {}, f"modules over {MAX_LINES} lines: {too_long}"
