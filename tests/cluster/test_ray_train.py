"""`tirl train` with `cluster.enabled=true`: RL steps whose rollouts run on local Ray rollout workers
(the tiny model, built from the run's config in each worker) and whose tool calls run on a tool worker."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("ray")

from tirl.cli import main  # noqa: E402

TINY_RL = ["pipeline.eval_before=false", "pipeline.sft=false", "pipeline.eval_after=false", "rl.steps=2",
           "rollout.group_size=2", "rollout.prompts_per_step=3", "rollout.max_new_tokens_per_turn=8",
           "rollout.max_new_tokens=16", "rollout.max_turns=2", "run.tensorboard=false", "run.threads=1"]


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_train_runs_rl_steps_on_the_ray_workers(local_ray, tiny_model_dir, tmp_path, monkeypatch, staleness):
    """Synchronous, and asynchronous (rl.max_staleness=1: step 2 sampled by the workers with the start
    weights while the trainer ran update 1)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"model.name={tiny_model_dir}", *TINY_RL, "cluster.enabled=true",
                 "cluster.rollout_workers=2", "cluster.tool_workers=1", "cluster.rollout_num_cpus=0.5",
                 "cluster.tool_num_cpus=0.5", f"rl.max_staleness={staleness}"]) == 0
    run = tmp_path / "runs" / "default"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    if staleness:
        assert [r["async/staleness"] for r in recs] == [0.0, 1.0]
    assert all(r["cluster/groups"] == 3 and r["cluster/reissued"] == 0 for r in recs)
    assert all(r["gen/tokens"] > 0 for r in recs)
    trajs = [json.loads(line) for line in (run / "trajectories" / "rl" / "step_000002.jsonl").read_text().splitlines()]
    assert len(trajs) == 6
    assert (run / "models" / "final").is_dir()
    assert _all_cpus_free(local_ray)  # the pool stopped its workers


def _all_cpus_free(ray, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
