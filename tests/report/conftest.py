"""A complete run directory (SFT, three RL steps, three evals) for the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.runs import write_run


@pytest.fixture
def run_dir(tmp_path, smol_dir) -> Path:
    return write_run(tmp_path / "run", smol_dir)
