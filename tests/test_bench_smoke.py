"""Every benchmark runs briefly, so that they cannot rot (figures are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHES = sorted(path.name for path in (REPO / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCHES)
def test_bench_quick_run(script: str) -> None:
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "a benchmark prints figures"
