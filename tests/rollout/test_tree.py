"""PORTool tree rollouts (reference 4.1) with a scripted model, real `ToolEnv`s and the calculator.

What the strategy must get right: n leaves per problem; node ids and edges that describe the tree;
leaves that share a node share exactly its tokens; forks only after a turn that called a tool and
left the episode open; f children per expanded node; the depth limit; seeded, reproducible
selection; a failing branch recorded, not fatal. Then the training side: shared steps trained once,
the portool estimator end to end, and `tirl train rollout.strategy=tree` on a tiny model.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
import torch

from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv
from tirl.errors import ConfigError
from tirl.rewards.base import RewardResult
from tirl.rollout.agent import TurnLimits
from tirl.rollout.groups import RolloutContext, RolloutSpec, run_strategy
from tirl.rollout.step import build_strategy
from tirl.rollout.tree import Tree, check_tree, child_id, node_spans, tree_edges
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator
from tirl.trainer.update import UpdateSettings, advantages_for
from tirl.types import StopReason, TreeEdge

TOOLS = ToolSet([calculator])
RIGHT = "<answer>2</answer><|im_end|>"
WRONG = "<answer>3</answer><|im_end|>"
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
BAD_CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
PROBLEM = Problem(id="p0", question="1+1?", answer="2")


def _reward(traj, problem, group):
    correct = traj.final_answer == f"<answer>{problem.answer}</answer>"
    return RewardResult(float(correct), {"correct": float(correct)}, correct)


def _ctx(fmt, script, seed=0, **spec):
    spec = {"group_size": 4, "limits": TurnLimits(max_turns=3), **spec}
    return RolloutContext(lambda p: ToolEnv(p, "Solve it.", TOOLS), ScriptedBackend(fmt.tokenizer, script), fmt,
                          RolloutSpec(**spec), _reward, seed=seed)


def _grow(fmt, script, tree=None, problems=(PROBLEM,), **ctx):
    ctx = _ctx(fmt, script, **ctx)
    return asyncio.run(run_strategy(tree or Tree(), list(problems), ctx)), ctx


def _node(request) -> str:
    """The node id a request samples (keys are ("tree", group, node id, turn))."""
    return request.key[2]


# first steps r.0 and r.1 answer (right, wrong); r.2 and r.3 call the tool; their children r.3.* answer
# (right, wrong) and r.2.* call again: two more leaves fill the tree, r.2's branch is dropped
FORCED = {"r.0": RIGHT, "r.1": WRONG, "r.3.0": RIGHT, "r.3.1": WRONG}


def forced_script(request, turn):
    return FORCED.get(_node(request), CALL)


def test_leaves_node_ids_edges_and_shared_tokens(smol_format):
    out, ctx = _grow(smol_format, forced_script)
    [group] = out.groups
    paths = [t.meta.node_ids for t in group.trajectories]
    assert paths == [("r", "r.0"), ("r", "r.1"), ("r", "r.3", "r.3.0"), ("r", "r.3", "r.3.1")]
    assert [t.meta.sample_index for t in group.trajectories] == [0, 1, 2, 3]
    assert group.rewards == [1.0, 0.0, 1.0, 0.0]
    assert set(group.edges) == {TreeEdge("r", "r.0"), TreeEdge("r", "r.1"), TreeEdge("r", "r.3"),
                                TreeEdge("r.3", "r.3.0"), TreeEdge("r.3", "r.3.1")}
    assert group.edges == tree_edges(group.trajectories)
    check_tree(group)
    # the two leaves through r.3 hold the very same tokens for it: prompt, sampled call, tool output
    a, b = group.trajectories[2:]
    end = a.turns[0].obs_end
    assert a.turns[0] == b.turns[0] and a.turns[0].tool_results[0].content == "2" and end > a.turns[0].gen_end
    assert a.prompt_ids == b.prompt_ids and a.response_ids[:end] == b.response_ids[:end]
    assert a.loss_mask[:end] == b.loss_mask[:end] and a.logprobs[:end] == b.logprobs[:end]
    assert a.response_ids[end:] != b.response_ids[end:]
    # f=2 children were proposed for both open first steps; r.2's are dropped (the tree was full)
    assert Counter(r.key[-1] for r in ctx.backend.requests) == {0: 4, 1: 4}
    assert {_node(r) for r in ctx.backend.requests if r.key[-1] == 1} == {"r.2.0", "r.2.1", "r.3.0", "r.3.1"}
    assert out.metrics["tree/candidates"] == 8 and out.metrics["tree/nodes"] == 5
    assert out.metrics["tree/step_sharing"] == pytest.approx(1 - 5 / 6)


def seeded_script(request, turn):
    """Answers or calls by the request's own seed: a different tree for every seed, the same for a seed."""
    return (RIGHT if request.seed % 2 else WRONG) if request.seed % 3 == 0 else CALL


@pytest.mark.parametrize("seed", range(4))
def test_forks_only_after_open_tool_turns(smol_format, seed):
    out, _ = _grow(smol_format, seeded_script, tree=Tree(branch_factor=3), seed=seed,
                   limits=TurnLimits(max_turns=4), group_size=5)
    [group] = out.groups
    check_tree(group)
    assert len(group.trajectories) == 5 and not out.failed
    paths = [t.meta.node_ids for t in group.trajectories]
    assert len(set(paths)) == 5
    for t in group.trajectories:
        spans = node_spans(t)
        for k, (parent, node, _, _) in enumerate(spans):
            assert node == child_id(parent, int(node.rsplit(".", 1)[1])) and int(node.rsplit(".", 1)[1]) < (
                5 if parent == "r" else 3)
            if k < len(spans) - 1:  # forked after this turn: it called a tool and the episode went on
                assert t.turns[k].tool_calls and t.turns[k].obs_end > t.turns[k].gen_end
        assert t.stop_reason in (StopReason.ANSWERED, StopReason.MAX_TURNS)
        assert t.stop_reason == StopReason.ANSWERED or len(t.turns) == 4


def test_selection_is_seeded_and_reproducible(smol_format):
    def tree(seed):
        out, _ = _grow(smol_format, seeded_script, seed=seed)
        [group] = out.groups
        return [(t.meta.node_ids, t.response_ids) for t in group.trajectories]

    assert tree(0) == tree(0)
    assert len({tuple(p for p, _ in tree(s)) for s in range(6)}) > 1


def test_branch_factor_and_depth_limit(smol_format):
    """Always calling: 3 first steps, 3 x 3 children at depth 1; max_depth=2 ends every leaf after its second
    turn with the normal turn-limit stop (the last call runs, its output is not inserted)."""
    out, ctx = _grow(smol_format, lambda r, t: CALL, tree=Tree(branch_factor=3, max_depth=2), group_size=3,
                     limits=TurnLimits(max_turns=5))
    [group] = out.groups
    assert Counter(r.key[-1] for r in ctx.backend.requests) == {0: 3, 1: 9}
    assert {_node(r) for r in ctx.backend.requests if r.key[-1] == 1} == {f"r.{i}.{j}" for i in range(3)
                                                                           for j in range(3)}
    assert len(group.trajectories) == 3
    for t in group.trajectories:
        assert len(t.turns) == 2 and t.stop_reason == StopReason.MAX_TURNS
        assert t.turns[1].tool_results and t.turns[1].obs_end == t.turns[1].gen_end
    assert len({t.meta.node_ids[1] for t in group.trajectories}) <= 3
    # branch_factor=1 is a flat group: every first step continues alone
    out, ctx = _grow(smol_format, lambda r, t: CALL, tree=Tree(branch_factor=1), group_size=3)
    assert [t.meta.node_ids for t in out.groups[0].trajectories] == [("r", f"r.{i}", f"r.{i}.0", f"r.{i}.0.0")
                                                                     for i in range(3)]


def test_a_node_whose_children_cannot_play_becomes_a_leaf(smol_format):
    """The first call spends the whole token budget: every child of r.0 and r.1 stops before playing a
    turn, so each first step ends as a leaf itself (one, not f copies), with its own path."""
    budget = len(smol_format.tokenizer.encode(CALL, add_special_tokens=False))
    out, _ = _grow(smol_format, lambda r, t: CALL, group_size=2,
                   limits=TurnLimits(max_turns=3, max_new_tokens=budget))
    [group] = out.groups
    assert [t.meta.node_ids for t in group.trajectories] == [("r", "r.0"), ("r", "r.1")]
    assert all(t.stop_reason == StopReason.MAX_TOKENS and len(t.turns) == 1 for t in group.trajectories)
    assert group.trajectories[0].turns[0].obs_end > group.trajectories[0].turns[0].gen_end
    check_tree(group)
    assert out.metrics["tree/candidates"] == 4  # 2 first steps + each one's children that could not play, once


def test_settings_come_from_the_config_and_are_checked():
    from tirl.config import Config

    cfg = Config.model_validate({"rollout": {"strategy": "tree", "tree": {"branch_factor": 3, "max_depth": 2}}})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, Tree) and (strategy.branch_factor, strategy.max_depth) == (3, 2)
    with pytest.raises(ValueError, match="branch_factor=0"):
        Tree(branch_factor=0)


def test_a_failing_branch_is_recorded_not_fatal(smol_format):
    def script(request, turn):
        if _node(request) == "r.1.1":
            raise RuntimeError("backend lost the request")
        return CALL if turn == 0 else RIGHT

    out, _ = _grow(smol_format, script, group_size=2, limits=TurnLimits(max_turns=2), max_failed_fraction=1.0)
    [failed] = out.failed
    assert failed.meta.node_ids == ("r", "r.1", "r.1.1") and "backend lost the request" in failed.meta.error
    [group] = out.groups
    assert len(group.trajectories) == 2 and all(t.meta.node_ids[-1] != "r.1.1" for t in group.trajectories)
    assert out.metrics["rollout/failed"] == 1


def test_several_problems_grow_separate_trees(smol_format):
    problems = [PROBLEM, Problem(id="p1", question="1+1 again?", answer="2")]
    out, _ = _grow(smol_format, forced_script, problems=problems)
    assert [g.task_id for g in out.groups] == ["p0", "p1"] and [g.group_id for g in out.groups] == ["0-0", "0-1"]
    assert [t.meta.node_ids for t in out.groups[0].trajectories] == [t.meta.node_ids
                                                                      for t in out.groups[1].trajectories]


# ----------------------------------------------------------------------------- training on trees


def test_shared_steps_are_trained_once(smol_format):
    out, _ = _grow(smol_format, forced_script)
    [group] = out.groups
    batch = advantages_for(out.groups, UpdateSettings())
    a, b = group.trajectories[2:]
    start, end = a.turns[0].gen_start, a.turns[0].gen_end
    for row, t in enumerate(group.trajectories):
        assert batch.mask[row, :len(t.loss_mask)].tolist() == list(t.loss_mask)  # as sampled
    assert batch.trained[2, start:end].eq(1).all() and batch.trained[3, start:end].eq(0).all()
    assert int(batch.trained[3].sum()) == b.num_sampled_tokens - (end - start)
    assert int(batch.trained.sum()) == sum(t.num_sampled_tokens for t in group.trajectories) - (end - start)
    # GRPO over the leaves [1, 0, 1, 0] = +-0.866; r.3 is held by a right and a wrong leaf: mean 0
    assert torch.allclose(batch.advantages[2, start:end], torch.zeros(end - start), atol=1e-6)
    assert batch.advantages[0, 0] == pytest.approx(math.sqrt(3) / 2, abs=1e-4)


def test_portool_on_a_tree_group(smol_format):
    """Root children r.0 (R=1+0.1), r.1 (0+0.1), r.3 (mean(1, 0)+0.1: its call ran ok): mean 0.6, std 0.5
    -> A_fork = +1, -1, 0; r.3.0 / r.3.1: +-0.7071. A_traj = +-0.866. omega=0.5: r.0 +0.933, r.1 -0.933,
    shared r.3 0.5*0 + 0.5*mean(0.866, -0.866) = 0, r.3.0 +0.7866, r.3.1 -0.7866."""
    out, _ = _grow(smol_format, forced_script)
    batch = advantages_for(out.groups, UpdateSettings(advantage="portool", advantage_kwargs={"eta": 0.1}))
    a, b = out.groups[0].trajectories[2:]
    first, second = a.turns[0], a.turns[1]
    got = [float(batch.advantages[0, 0]), float(batch.advantages[1, 0]), float(batch.advantages[2, first.gen_start]),
           float(batch.advantages[2, second.gen_start]), float(batch.advantages[3, b.turns[1].gen_start])]
    assert got == pytest.approx([0.93301, -0.93301, 0.0, 0.78657, -0.78657], abs=1e-4)


def test_portool_with_flat_groups_is_a_config_error(smol_format):
    ctx = _ctx(smol_format, forced_script, group_size=2)
    from tirl.rollout.groups import Flat

    out = asyncio.run(run_strategy(Flat(), [PROBLEM], ctx))
    with pytest.raises(ConfigError, match="portool.*rollout.strategy=tree"):
        advantages_for(out.groups, UpdateSettings(advantage="portool"))


# ----------------------------------------------------------------------------- end to end

FAST = ["sft.examples=8", "sft.batch_size=4", "rl.steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2", "eval.size=4",
        "pipeline.eval_before=false", "pipeline.eval_after_sft=false", "rollout.strategy=tree"]


@pytest.mark.parametrize("advantage", ["grpo", "portool"])
def test_train_with_tree_rollouts(tmp_path, monkeypatch, tiny_model_dir, advantage):
    from tirl.cli import main
    from tirl.rollout.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    assert main(["train", f"model.name={tiny_model_dir}", *FAST, f"algorithm.advantage={advantage}"]) == 0
    run = tmp_path / "runs" / "default"
    for step in (1, 2):
        trajs = list(read_jsonl(run / "trajectories" / "rl" / f"step_{step:06d}.jsonl"))
        assert len(trajs) == 4 and all(t.meta.node_ids[0] == "r" and len(t.meta.node_ids) == len(t.turns) + 1
                                       for t in trajs)
    metrics = (run / "metrics.jsonl").read_text()
    assert "tree/candidates" in metrics


def test_update_on_a_scripted_tree_counts_shared_tokens_once(smol_format, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tirl.trainer.update import rl_update

    out, _ = _grow(smol_format, forced_script)
    [group] = out.groups
    shared = group.trajectories[2].turns[0].gen_end - group.trajectories[2].turns[0].gen_start
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    s = UpdateSettings(micro_batch_size=2)
    metrics = rl_update(model, torch.optim.SGD(model.parameters(), lr=0.1), advantages_for(out.groups, s), s)
    assert metrics["train/tokens"] == sum(t.num_sampled_tokens for t in group.trajectories) - shared
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0


def test_episodes_that_cannot_start_are_root_leaves(smol_format):
    """A prompt that fills the context: no first step plays; each leaf is the root alone, and training on
    the group trains nothing (without failing)."""
    out, _ = _grow(smol_format, lambda r, t: CALL, group_size=2, limits=TurnLimits(max_turns=3, max_context=8))
    [group] = out.groups
    assert [t.meta.node_ids for t in group.trajectories] == [("r",), ("r",)] and group.edges == ()
    assert all(t.stop_reason == StopReason.CONTEXT_OVERFLOW for t in group.trajectories)
    batch = advantages_for(out.groups, UpdateSettings(advantage="portool"))
    assert int(batch.trained.sum()) == 0


@pytest.mark.parametrize("strategy", ["flat", "fission"])
def test_preflight_refuses_a_tree_estimator_on_flat_groups(strategy):
    from tirl.config import load_config
    from tirl.errors import ConfigError
    from tirl.trainer.build import preflight

    cfg = load_config(None, [f"rollout.strategy={strategy}", "algorithm.advantage=portool"])
    with pytest.raises(ConfigError, match=f"algorithm.advantage=portool needs rollout trees, but "
                                          f"rollout.strategy={strategy} samples flat groups"):
        preflight(cfg)
    for tree_strategy in ("tree", "entropy_branch"):
        preflight(load_config(None, [f"rollout.strategy={tree_strategy}", "algorithm.advantage=portool"]))
