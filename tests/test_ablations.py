"""The ablation scripts' shared readings (recipes/ablations): intervals against hand values, the
recovery statistics of the Fission ablation on hand-built trajectories, and every script importable."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rewards.builders import Step, trajectory
from tirl.types import ToolStatus

ABLATIONS = Path(__file__).resolve().parents[1] / "recipes" / "ablations"
sys.path.insert(0, str(ABLATIONS))
common = pytest.importorskip("common")
fission = pytest.importorskip("fission_vs_grpo")

FAULT, CALL = fission.FAULT, ("calculator", {"expression": "6*7"})


def sample(task_id: str, correct: bool, *steps) -> object:
    return dataclasses.replace(trajectory(*steps, task_id=task_id), correct=correct)


def test_mean_ci_is_the_t_interval_over_seeds():
    """[1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.30, half width 4.30 / sqrt(3) = 2.4826."""
    m, lo, hi = common.mean_ci([1.0, 2.0, 3.0])
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 2.4826, 2.0 + 2.4826), abs=1e-4)
    assert common.mean_ci([0.5])[0] == 0.5 and all(x != x for x in common.mean_ci([0.5])[1:])


def test_paired_bootstrap_resamples_problems_of_both_arms_together():
    """10 problems, a right on p0-p3, b on p0-p5 (difference 0.2): in a paired resample b - a is the share
    of draws that hit p4 or p5, never negative; unpaired draws would often make it negative."""
    a = {f"p{i}": [sample(f"p{i}", i < 4, "x")] for i in range(10)}
    b = {f"p{i}": [sample(f"p{i}", i < 6, "x")] for i in range(10)}
    lo, hi = common.paired_bootstrap(a, b, common.accuracy, draws=500)
    assert 0.0 <= lo <= 0.2 <= hi <= 0.6
    assert common.paired_bootstrap(a, a, common.accuracy, draws=50) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different problems"):
        common.paired_bootstrap(a, {"p0": b["p0"]}, common.accuracy)


def test_fission_readings_count_only_injected_faults():
    """4 samples: fault then retry then right; fault then give up (wrong); a real execution error (not a
    fault) then right; no fault and right. Faulted: 2 -> recovery 1/2, retry 1/2; clean accuracy 2/2."""
    fault = Step("", [CALL], [ToolStatus.EXECUTION_ERROR], [FAULT])
    ok = Step("", [CALL], outputs=["42"])
    real_error = Step("", [CALL], [ToolStatus.EXECUTION_ERROR], ["Error: ZeroDivisionError"])
    rows = [[sample("p0", True, fault, ok, "<answer>42</answer>"), sample("p0", False, fault, "<answer>7</answer>")],
            [sample("p1", True, real_error, ok, "<answer>42</answer>"), sample("p1", True, ok, "<answer>42</answer>")]]
    assert FAULT.startswith("Error: the calculator service is temporarily unavailable")
    assert (fission.recovery(rows), fission.retry(rows), fission.clean_accuracy(rows)) == (0.5, 0.5, 1.0)
    assert fission.table({"arm": {"p0": rows[0], "p1": rows[1]}})["arm"]["faulted"] == 0.5


@pytest.mark.parametrize("script", sorted(p.name for p in ABLATIONS.glob("*.py") if p.name != "common.py"))
def test_every_ablation_script_runs_its_help(script):
    out = subprocess.run([sys.executable, str(ABLATIONS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout
