"""Every environment's recipe runs `tirl train` on the default model: a short cold start, two RL steps, an eval.

Marked slow; CI runs it. The budgets are cut (8 SFT traces, 2 steps of 2 prompts x 4 samples, 4 eval
problems): this proves that each recipe's task, tools, reward, SFT data and settings work together
end to end, with the report written at the end. What each recipe reaches is in its env's README.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ENV_RECIPES = ("math_python", "search_qa", "text_to_sql", "code", "function_calling")
SHORT = ["sft.epochs=1", "pipeline.eval_after_sft=false", "eval.size=4", "eval.no_tools=false",
         "rl.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_batch_size=8",
         "run.tensorboard=false"]


def _cold_start_data(name: str, tmp_path: Path) -> list[str]:
    """function_calling cold-starts on demonstrations written beforehand (its recipe says how)."""
    if name != "function_calling":
        return ["sft.examples=8"]
    from tirl.tasks.bfcl.demos import main as write_demos

    demos = tmp_path / "demos.jsonl"
    assert write_demos(["--count", "8", "--max-prompt-chars", "3000", "--out", str(demos)]) == 0
    return [f"sft.rollouts=[{demos}]"]


@pytest.mark.parametrize("name", ENV_RECIPES)
def test_env_recipe_trains_on_the_default_model(tmp_path, name):
    run = tmp_path / name
    extra = _cold_start_data(name, tmp_path)
    # A process of its own per recipe: each loads its model, tools and data, and the memory goes with it.
    done = subprocess.run([sys.executable, "-m", "tirl.cli", "train", str(RECIPES / f"{name}.yaml"), f"run.dir={run}",
                           *SHORT, *extra], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "rl"]
    assert len(rl) == 2 and all(math.isfinite(m["reward/mean"]) for m in rl)
    results = json.loads((run / "results.json").read_text())["results"]
    assert {"base", "final"} <= set(results) and results["final"]["problems"] == 4
    assert (run / "report.html").is_file() and (run / "models" / "final" / "config.json").is_file()
