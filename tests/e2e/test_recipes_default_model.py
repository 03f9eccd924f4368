"""Every algorithm-family recipe under recipes/ runs `tirl train` on the default model.

Marked slow; CI runs it. The default model is cold-started once with the default SFT (as the default
job does), then each recipe runs two RL steps from it with its own algorithm, reward and rollout
settings; each must train (finite loss, its own metrics present). How well each does is measured
elsewhere (recipes/README.md); this proves that what a recipe names exists and works together.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tirl.cli import main

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHORT = ["pipeline.sft=false", "pipeline.eval_before=false", "pipeline.eval_after_sft=false",
         "pipeline.eval_after=false", "rl.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4"]

FAMILY_METRIC = {
    "toolrl": "reward/correct",
    "otc": "reward/r_tool",
    "portool": "train/loss",
    "fission": "fission/contexts",
    "dapo": "dynamic/kept",
    "drgrpo": "train/loss",
    "ppo": "critic/vf_loss",
}
"""Each family recipe and a metric only it (or its family) writes."""


@pytest.fixture(scope="module")
def cold_started(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cold-start")
    assert main(["sft", f"run.dir={root}"]) == 0
    return root / "models" / "sft"


def test_every_family_has_a_recipe():
    assert sorted(FAMILY_METRIC) == sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem in FAMILY_METRIC)


@pytest.mark.parametrize("name", sorted(FAMILY_METRIC))
def test_recipe_trains_on_the_default_model(tmp_path, cold_started, name):
    run = tmp_path / name
    assert main(["train", str(RECIPES / f"{name}.yaml"), f"model.name={cold_started}", f"run.dir={run}", *SHORT]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "rl"]
    assert len(rl) == 2
    assert all(math.isfinite(m["reward/mean"]) for m in rl)
    assert any(FAMILY_METRIC[name] in m for m in rl), f"{name}: no {FAMILY_METRIC[name]} in {sorted(rl[-1])}"
    assert (run / "models" / "final" / "config.json").exists()
