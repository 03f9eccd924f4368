"""`tirl train` with each rollout strategy on the default recipe and the default model.

Marked slow; CI runs it. The default model is cold-started once (`tirl sft`, as the default job
does), then each strategy runs a few RL steps of the default recipe from it. After the cold start the
model calls the calculator, sometimes wrongly, and solves some problems: fission finds real tool
errors to recover from, dynamic sampling finds groups whose rewards differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tirl.cli import main
from tirl.rollout.io import read_jsonl

pytestmark = pytest.mark.slow

SHORT = ["pipeline.sft=false", "pipeline.eval_before=false", "pipeline.eval_after_sft=false",
         "pipeline.eval_after=false", "rl.steps=2", "rollout.prompts_per_step=4", "rollout.group_size=4"]


@pytest.fixture(scope="module")
def cold_started(tmp_path_factory) -> Path:
    """The default model after the default recipe's SFT cold start."""
    root = tmp_path_factory.mktemp("cold-start")
    assert main(["sft", f"run.dir={root}"]) == 0
    return root / "models" / "sft"


def _train(tmp_path: Path, model: Path, *overrides: str) -> tuple[list[dict], list]:
    """Metrics of the RL steps and the trajectories trained on."""
    run = tmp_path / "rl"
    assert main(["train", f"model.name={model}", f"run.dir={run}", *SHORT, *overrides]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = sorted((run / "trajectories" / "rl").glob("step_??????.jsonl"))
    trajs = [t for f in trained for t in read_jsonl(f)]
    return [m for m in metrics if m["stage"] == "rl"], trajs


def test_fission_trains_on_recovery_groups_from_real_tool_errors(tmp_path, cold_started):
    metrics, trajs = _train(tmp_path, cold_started, "rollout.strategy=fission")
    assert len(metrics) == 2
    assert sum(m["fission/groups"] for m in metrics) > 0, "no tool error to recover from in two steps"
    recovery = [t for t in trajs if t.meta.origin]
    assert recovery and all(t.meta.origin.startswith("fission:") for t in recovery)
    originals = {(t.meta.step, t.meta.group_id, t.meta.sample_index): t for t in trajs if not t.meta.origin}
    for t in recovery:
        fields = dict(kv.split("=") for kv in t.meta.origin.removeprefix("fission:").split(","))
        failed = originals[(int(fields["step"]), fields["group"], int(fields["sample"]))]
        turn = failed.turns[int(fields["turn"])]
        # the recovery prompt is the failed trajectory up to its failed call (prompt tokens: never trained)
        assert t.prompt_ids[:len(failed.prompt_ids) + turn.gen_end] == failed.prompt_ids + \
            failed.response_ids[:turn.gen_end]
        assert any(r.status.value in ("execution_error", "timeout", "validation_error") for r in turn.tool_results)


def test_dynamic_sampling_trains_only_on_groups_that_vary(tmp_path, cold_started):
    metrics, trajs = _train(tmp_path, cold_started, "rollout.dynamic_sampling.enabled=true")
    assert all(m["dynamic/kept"] == 4 for m in metrics)
    trained: dict[tuple, set[float]] = {}
    for t in trajs:
        trained.setdefault((t.meta.step, t.meta.group_id), set()).add(t.reward)
    assert len(trained) == 8 and all(len(rewards) > 1 for rewards in trained.values())


def _shared_steps(trajs) -> int:
    """Tree nodes below the root that more than one trained leaf of a group passes through."""
    seen: dict[tuple, int] = {}
    for t in trajs:
        for node in t.meta.node_ids[1:]:
            key = (t.meta.step, t.meta.group_id, node)
            seen[key] = seen.get(key, 0) + 1
    return sum(1 for n in seen.values() if n > 1)


@pytest.mark.parametrize("advantage", ["grpo", "portool"])
def test_tree_rollouts_fork_at_tool_calls(tmp_path, cold_started, advantage):
    metrics, trajs = _train(tmp_path, cold_started, "rollout.strategy=tree", f"algorithm.advantage={advantage}")
    assert all(len(t.meta.node_ids) == len(t.turns) + 1 for t in trajs)
    assert _shared_steps(trajs) > 0 and sum(m["tree/step_sharing"] for m in metrics) > 0
    for t in trajs:  # a shared step forks only after a turn that called a tool
        assert all(turn.tool_calls for turn in t.turns[:-1])


def test_entropy_branching_runs_on_the_policy_entropies(tmp_path, cold_started):
    metrics, trajs = _train(tmp_path, cold_started, "rollout.strategy=entropy_branch")
    assert all(m["branch/leaves"] == 4 for m in metrics)
    assert all(t.meta.node_ids and t.meta.node_ids[0] == "r" for t in trajs)
    assert len(trajs) == 2 * 4 * 4
