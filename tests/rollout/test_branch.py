"""Entropy-guided branching (reference 4.5) with a scripted model whose entropies are chosen by hand, real
`ToolEnv`s and the real calculator tool; and `tirl train rollout.strategy=entropy_branch` on a tiny model.

What the strategy must get right: the hand checks of 4.5 (beta -> 0 gives m = k/2; with P(l) = 1 a path
that has just branched does not branch again); a fork exactly where the entropy after a tool result rises
enough; never more than k leaves, and k leaves unless rollouts fail; forks share their parent's tokens up
to a tool result, and node_ids and edges say exactly which tokens are shared; reproducible from the seed;
a failing fork is recorded as failed, never crashes the step.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv
from tirl.errors import ConfigError, RolloutError
from tirl.rewards.base import RewardResult
from tirl.rollout.agent import TurnLimits
from tirl.rollout.branch import EntropyBranch, branch_score, initial_samples, normalised_change, sigmoid
from tirl.rollout.groups import RolloutContext, RolloutSpec, run_strategy
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator
from tirl.rollout.tree import check_tree
from tirl.types import StopReason

TOOLS = ToolSet([calculator])
RIGHT = "<answer>2</answer><|im_end|>"


def call(expression: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def _reward(traj, problem, group):
    correct = traj.final_answer == f"<answer>{problem.answer}</answer>"
    return RewardResult(float(correct), {"correct": float(correct)}, correct)


def _problems(n: int = 1) -> list[Problem]:
    return [Problem(id=f"p{i}", question="1+1?", answer="2") for i in range(n)]


def calls_then_answer(request, turn):
    """Every path calls the calculator until its last turn (max_turns 4), then answers; the expression
    names the path (key (group, index)) and the turn, so tokens differ between paths after a fork."""
    _, index, _ = request.key
    return call(f"{index}+{turn}") if turn < 3 else RIGHT


def by_turn(*values: float):
    """Entropy of every sampled token of turn t: values[t] (the last one for later turns)."""
    return lambda request, turn: values[min(turn, len(values) - 1)]


def _ctx(fmt, script=calls_then_answer, entropies=None, k=4, make_env=None, seed=0, **spec):
    make_env = make_env or (lambda p: ToolEnv(p, "Solve it.", TOOLS))
    spec = {"group_size": k, "limits": TurnLimits(max_turns=4), **spec}
    backend = ScriptedBackend(fmt.tokenizer, script, entropies=entropies)
    return RolloutContext(make_env, backend, fmt, RolloutSpec(**spec), _reward, seed=seed)


def _run(strategy, ctx, problems=None):
    return asyncio.run(run_strategy(strategy, problems or _problems(), ctx))


def _leaves(out):
    return sorted([t for g in out.groups for t in g.trajectories] + out.failed,
                  key=lambda t: (t.meta.group_id, t.meta.sample_index))


def _children(edges):
    children: dict[str, list[str]] = {}
    for e in edges:
        children.setdefault(e.parent, []).append(e.child)
    return children


# ----------------------------------------------------------------------------- formulas


def test_formulas_by_hand():
    assert sigmoid(0.0) == 0.5 and sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0
    # beta -> 0: m = k/2 whatever the entropies
    assert initial_samples(8, 1e-9, 5.0, 0.1) == 4 and initial_samples(16, 0.0, 0.1, 9.0) == 8
    # 8 * sigmoid(0.5 * (2 - 1)) = 4.98 -> 5; 8 * sigmoid(1 * (1 - 3)) = 0.95 -> 1; never below 1 or above k
    assert initial_samples(8, 0.5, 2.0, 1.0) == 5 and initial_samples(8, 1.0, 1.0, 3.0) == 1
    assert initial_samples(8, 50.0, 0.0, 9.0) == 1 and initial_samples(8, 50.0, 9.0, 0.0) == 8
    assert initial_samples(3, 0.0, 0.0, 0.0) == 2  # 1.5 rounds half up
    # dH: relative change, clipped to [-1, 1]
    assert normalised_change(1.5, 1.0) == 0.5 and normalised_change(4.0, 1.0) == 1.0
    assert normalised_change(0.0, 2.0) == -1.0 and normalised_change(0.0, 0.0) == 0.0
    assert normalised_change(0.3, 0.0) == 1.0
    # P_t = (alpha + gamma dH)(1 - min(penalty l, 1)): (0.5 + 0.2)(1 - 0.2) = 0.56
    assert math.isclose(branch_score(1.0, 1, 0.5, 0.2, 0.2), 0.56)
    assert branch_score(1.0, 0, 0.5, 0.2, 0.2) == pytest.approx(0.7)
    assert branch_score(1.0, 5, 0.5, 0.2, 0.2) == 0.0  # P(5) = min(1, 1)
    assert branch_score(1.0, 1, 0.5, 0.2, 1.0) == 0.0  # P(l) = 1: no branching right after one


# ----------------------------------------------------------------------------- pre-monitoring


@pytest.mark.parametrize("beta, h_root, h_tool, m", [
    (0.0, 1.0, 3.0, 4),   # beta -> 0: k/2
    (1e-9, 3.0, 1.0, 4),
    (0.5, 2.0, 1.0, 5),   # tools calm the model down: more independent samples
    (1.0, 1.0, 3.0, 1),   # tools make it unsure: the budget goes to branching
])
def test_pre_monitoring_sets_the_initial_samples(smol_format, beta, h_root, h_tool, m):
    ctx = _ctx(smol_format, entropies=by_turn(h_root, h_tool), k=8)
    out = _run(EntropyBranch(beta=beta), ctx)
    assert out.metrics["branch/initial"] == m
    [group] = out.groups
    assert len(group.trajectories) == 8
    # the m initial samples are the root's children made before any fork
    roots = [t.meta.node_ids[1] for t in group.trajectories if t.meta.sample_index < m]
    assert roots == [f"r.{i}" for i in range(m)]


def test_initial_set_replaces_pre_monitoring(smol_format):
    ctx = _ctx(smol_format, entropies=by_turn(1.0, 3.0), k=8)
    out = _run(EntropyBranch(initial=3, beta=1.0), ctx)
    assert out.metrics["branch/initial"] == 3
    # no probe: the first requests are the three initial paths' first turns, together
    assert [r.key for r in ctx.backend.requests[:3]] == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_initial_more_than_the_group_is_a_config_error(smol_format):
    with pytest.raises(ConfigError, match="rollout.entropy_branch.initial=5 is more than rollout.group_size=4"):
        _run(EntropyBranch(initial=5), _ctx(smol_format, entropies=1.0))


# ----------------------------------------------------------------------------- branching


def test_branches_exactly_where_the_entropy_after_a_tool_result_rises(smol_format):
    """H per turn: 1, 1, 2, 1. Step 0 (turn 1 after the first result): dH = 0, P = 0.5, not above 0.5.
    Step 1 (turn 2): dH = 1, P = 0.7: branch. Step 2 (turn 3): dH = 0, l = 1, P = 0.4: no."""
    ctx = _ctx(smol_format, entropies=by_turn(1.0, 1.0, 2.0, 1.0), k=4)
    out = _run(EntropyBranch(initial=2), ctx)
    [group] = out.groups
    ids = {t.meta.sample_index: t.meta.node_ids for t in group.trajectories}
    assert ids == {0: ("r", "r.0", "r.0.0", "r.0.0.0", "r.0.0.0.0"),
                   1: ("r", "r.1", "r.1.0", "r.1.0.0", "r.1.0.0.0"),
                   2: ("r", "r.0", "r.0.0", "r.0.0.1", "r.0.0.1.0"),
                   3: ("r", "r.1", "r.1.0", "r.1.0.1", "r.1.0.1.0")}
    assert out.metrics["branch/branches"] == 2 and out.metrics["branch/leaves"] == 4
    assert out.metrics["branch/fresh"] == 0 and out.metrics["branch/initial"] == 2
    # decisions: paths 0, 1 at steps 0, 1, 2 (dH 0, 1, 0); forks at step 2 only (dH 0): mean 2/8
    assert out.metrics["branch/delta_entropy"] == pytest.approx(0.25)
    # the forks sampled turn 2 themselves, from right after the tool result of turn 1
    for t in group.trajectories:
        assert t.stop_reason == StopReason.ANSWERED and t.reward == 1.0
    fork_requests = [r for r in ctx.backend.requests if r.key[1] >= 2]
    assert [r.key[2] for r in fork_requests] == [2, 2, 3, 3]
    parent = group.trajectories[0]
    first = next(r for r in fork_requests if r.key[1] == 2)
    assert first.prompt_ids == parent.prompt_ids + parent.response_ids[:parent.turns[1].obs_end]
    assert smol_format.decode(list(first.prompt_ids)).endswith("<|im_start|>assistant\n")
    assert parent.turns[1].tool_results[0].ok


@pytest.mark.parametrize("probe_tokens, branches", [(2, 2), (30, 0)])
def test_only_the_first_probe_tokens_after_a_tool_result_count(smol_format, probe_tokens, branches):
    """Turn 1 starts unsure (entropy 3 on its first two tokens) and then is sure (0): its mean over 2 tokens
    is 3 (dH = 1, branch); over 30 it is below turn 0's 1.0 (dH < 0, no branch)."""
    def entropies(request, turn):
        return [1.0] if turn == 0 else [3.0, 3.0] + [0.0] * 40

    ctx = _ctx(smol_format, entropies=entropies, k=4)
    out = _run(EntropyBranch(initial=2, probe_tokens=probe_tokens, penalty=1.0), ctx)
    assert out.metrics["branch/branches"] == branches


def test_falling_entropy_never_branches_and_the_budget_goes_to_fresh_samples(smol_format):
    ctx = _ctx(smol_format, entropies=by_turn(2.0, 1.0), k=5)
    out = _run(EntropyBranch(initial=2), ctx)
    [group] = out.groups
    assert len(group.trajectories) == 5 and out.metrics["branch/branches"] == 0
    assert out.metrics["branch/fresh"] == 3
    assert [t.meta.node_ids[1] for t in group.trajectories] == ["r.0", "r.1", "r.2", "r.3", "r.4"]
    assert all(len(_children(group.edges).get(n, [])) <= 1 for t in group.trajectories for n in t.meta.node_ids[1:])


@pytest.mark.parametrize("k, initial, z", [(5, 2, 3), (3, 1, 4), (8, 2, 2), (16, 1, 3)])
def test_never_more_than_k_leaves(smol_format, k, initial, z):
    """Entropy doubles after every tool result: every step wants to branch; the budget stops it."""
    ctx = _ctx(smol_format, entropies=by_turn(1.0, 2.0), k=k)
    out = _run(EntropyBranch(initial=initial, branch_factor=z), ctx, _problems(2))
    assert [len(g.trajectories) for g in out.groups] == [k, k]
    assert not out.failed and out.metrics["branch/leaves"] == k
    for g in out.groups:
        children = _children(g.edges)
        assert all(len(c) <= z for n, c in children.items() if n != "r")


def test_the_last_leaves_go_to_the_first_path_in_order(smol_format):
    """k = 5, m = 2, Z = 3: path 0 branches first and takes two forks; path 1 gets the last leaf."""
    ctx = _ctx(smol_format, entropies=by_turn(1.0, 2.0), k=5)
    out = _run(EntropyBranch(initial=2, branch_factor=3), ctx)
    [group] = out.groups
    assert [t.meta.node_ids[:3] for t in group.trajectories] == [
        ("r", "r.0", "r.0.0"), ("r", "r.1", "r.1.0"), ("r", "r.0", "r.0.1"), ("r", "r.0", "r.0.2"),
        ("r", "r.1", "r.1.1")]


def _consecutive_branchings(group) -> bool:
    """Whether some leaf passes two branching nodes in a row (both below the root)."""
    branching = {n for n, c in _children(group.edges).items() if len(c) > 1 and n != "r"}
    return any(a in branching and b in branching
               for t in group.trajectories for a, b in zip(t.meta.node_ids[1:], t.meta.node_ids[2:]))


def test_with_full_penalty_a_path_that_just_branched_does_not_branch_again(smol_format):
    """P(l) = min(penalty l, 1) with penalty 1: right after a branching P = 0, then l is back to 0."""
    ctx = _ctx(smol_format, entropies=by_turn(1.0, 2.0), k=16)
    out = _run(EntropyBranch(initial=1, penalty=1.0), ctx)
    [group] = out.groups
    check_tree(group)  # the trainer's own consistency check: shared nodes are the same tokens in every leaf
    assert out.metrics["branch/branches"] > 1 and not _consecutive_branchings(group)
    # path 0 branches at steps 0 and 2, not at step 1
    assert _children(group.edges)["r.0"] == ["r.0.0", "r.0.1"]
    assert _children(group.edges)["r.0.0"] == ["r.0.0.0"]
    assert _children(group.edges)["r.0.0.0"] == ["r.0.0.0.0", "r.0.0.0.1"]
    # the same run with the default penalty 0.2 branches twice in a row ((0.5 + 0.2)(1 - 0.2) = 0.56 > 0.5)
    again = _run(EntropyBranch(initial=1), _ctx(smol_format, entropies=by_turn(1.0, 2.0), k=16))
    assert _consecutive_branchings(again.groups[0])


def test_forks_only_after_tool_calls(smol_format):
    """Very high entropy at the start of the answer and a path that answers without a tool: no fork anywhere
    but at nodes whose turn returned tool results."""
    def script(request, turn):
        _, index, _ = request.key
        return RIGHT if index % 2 else calls_then_answer(request, turn)

    ctx = _ctx(smol_format, script, entropies=by_turn(5.0, 9.0), k=8)
    out = _run(EntropyBranch(initial=4), ctx)
    [group] = out.groups
    children = _children(group.edges)
    for t in group.trajectories:
        for j, node in enumerate(t.meta.node_ids[1:]):
            if len(children.get(node, [])) > 1:
                assert t.turns[j].tool_results, (t.meta.node_ids, j)
    answered_at_once = [t for t in group.trajectories if len(t.turns) == 1]
    assert answered_at_once and all(len(children.get(t.meta.node_ids[1], [])) == 0 for t in answered_at_once)
    assert len(group.trajectories) == 8 and out.metrics["branch/branches"] > 0


def test_shared_prefixes_are_identical_tokens_and_node_ids_say_which(smol_format):
    """Two leaves have equal node_ids[j + 1] exactly when their turns 0..j are the same tokens (sampled and
    inserted); every text names the path, so a re-sampled turn always differs."""
    def script(request, turn):
        _, index, _ = request.key
        return calls_then_answer(request, turn) if turn < 3 else f"<answer>{index}</answer><|im_end|>"

    ctx = _ctx(smol_format, script, entropies=by_turn(1.0, 2.0, 1.0, 3.0), k=10)
    out = _run(EntropyBranch(), ctx, _problems(2))
    for group in out.groups:
        leaves = group.trajectories
        assert len(leaves) == 10
        for a in leaves:
            assert a.meta.node_ids[0] == "r" and len(a.meta.node_ids) == len(a.turns) + 1
            for b in leaves:
                assert a.prompt_ids == b.prompt_ids
                for j in range(min(len(a.turns), len(b.turns))):
                    same_tokens = (a.response_ids[:a.turns[j].obs_end] == b.response_ids[:b.turns[j].obs_end]
                                   and a.loss_mask[:a.turns[j].obs_end] == b.loss_mask[:b.turns[j].obs_end]
                                   and a.logprobs[:a.turns[j].obs_end] == b.logprobs[:b.turns[j].obs_end])
                    assert (a.meta.node_ids[j + 1] == b.meta.node_ids[j + 1]) == same_tokens
        # edges: exactly the consecutive pairs of the leaves' node ids; every node but the root has one parent
        pairs = {(p, c) for t in leaves for p, c in zip(t.meta.node_ids, t.meta.node_ids[1:])}
        assert set((e.parent, e.child) for e in group.edges) == pairs and len(group.edges) == len(pairs)
        assert len({e.child for e in group.edges}) == len(group.edges)
        assert all(e.child.rsplit(".", 1)[0] == e.parent for e in group.edges)
        assert max(len(c) for c in _children(group.edges).values()) > 1  # it is a tree, not a flat group


def test_reproducible_from_the_seed(smol_format):
    """Text and entropies follow the sampling seed: the same seed gives the same tree, another seed another."""
    def script(request, turn):
        return call(f"{request.seed % 97}+1") if turn < 3 else RIGHT

    def entropies(request, turn):
        return 1.0 + (request.seed % 5) / 4

    def run(seed):
        out = _run(EntropyBranch(initial=2), _ctx(smol_format, script, entropies, k=6, seed=seed), _problems(2))
        return [(t.meta.node_ids, t.response_ids, t.meta.sample_index) for g in out.groups for t in g.trajectories]

    first = run(0)
    assert run(0) == first
    assert run(1) != first


@pytest.mark.parametrize("where", ["generation", "env"])
def test_a_failing_fork_is_recorded_as_failed(smol_format, where):
    """Forks (paths 2 and 3) fail in their first generation, or their env fails while replaying."""
    def script(request, turn):
        if where == "generation" and request.key[1] >= 2:
            raise RuntimeError("the model server went away")
        return calls_then_answer(request, turn)

    envs = []

    class Flaky(ToolEnv):
        async def step(self, assistant):
            if where == "env" and self in envs[2:]:
                raise OSError("sandbox lost")
            return await super().step(assistant)

    def make_env(problem):
        envs.append(Flaky(problem, "Solve it.", TOOLS))
        return envs[-1]

    ctx = _ctx(smol_format, script, entropies=by_turn(1.0, 2.0), k=4, make_env=make_env, max_failed_fraction=0.5)
    out = _run(EntropyBranch(initial=2), ctx)
    [group] = out.groups
    assert [t.meta.sample_index for t in group.trajectories] == [0, 1]
    assert all(t.stop_reason == StopReason.ANSWERED for t in group.trajectories)
    assert [t.meta.sample_index for t in out.failed] == [2, 3]
    message = "RuntimeError: the model server went away" if where == "generation" else "OSError: sandbox lost"
    for t in out.failed:
        assert t.stop_reason == StopReason.ERROR and t.meta.error.startswith(message)
        assert t.meta.node_ids[:2] == ("r", f"r.{t.meta.sample_index - 2}")
        assert len(t.meta.node_ids) == len(t.turns) + 1
    assert out.metrics["rollout/failed"] == 2 and out.metrics["branch/leaves"] == 4
    # edges only from the kept leaves
    assert set(e.child for e in group.edges) == {n for t in group.trajectories for n in t.meta.node_ids[1:]}


def test_a_backend_without_entropies_is_an_error_not_a_silent_flat_run(smol_format):
    with pytest.raises(RolloutError, match="needs token entropies.*ScriptedBackend"):
        _run(EntropyBranch(), _ctx(smol_format, entropies=None))


# ----------------------------------------------------------------------------- config and run


@pytest.mark.parametrize("override, message", [
    ("rollout.entropy_branch.branch_factor=1", "rollout.entropy_branch.branch_factor"),
    ("rollout.entropy_branch.penalty=-0.1", "rollout.entropy_branch.penalty"),
    ("rollout.entropy_branch.probe_tokens=0", "rollout.entropy_branch.probe_tokens"),
])
def test_config_builds_the_strategy_and_names_a_bad_setting(override, message):
    from tirl.config import load_config
    from tirl.rollout.step import build_strategy

    strategy = build_strategy(load_config(None, ["rollout.strategy=entropy_branch",
                                                 "rollout.entropy_branch.gamma=0.3",
                                                 "rollout.entropy_branch.initial=2"]))
    assert isinstance(strategy, EntropyBranch) and strategy.gamma == 0.3 and strategy.initial == 2
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.strategy=entropy_branch", override])


@pytest.mark.parametrize("kwargs, message", [
    ({"branch_factor": 1}, "branch_factor=1: must be at least 2"),
    ({"initial": 0}, "initial=0: must be at least 1"),
    ({"penalty": -1.0}, "penalty=-1.0: must be at least 0"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropyBranch(**kwargs)


def test_train_with_entropy_branch_on_a_tiny_model(tmp_path, monkeypatch, tiny_model_dir):
    """Whatever the random model's entropies, the run completes and its trajectories carry node ids."""
    from tirl.cli import main
    from tirl.rollout.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    fast = ["sft.examples=8", "sft.batch_size=4", "rl.steps=2", "rollout.group_size=3", "rollout.prompts_per_step=2",
            "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "rollout.max_turns=2", "eval.size=4"]
    assert main(["train", f"model.name={tiny_model_dir}", *fast, "rollout.strategy=entropy_branch",
                 "rollout.entropy_branch.probe_tokens=4", "pipeline.eval_before=false",
                 "pipeline.eval_after_sft=false"]) == 0
    run = tmp_path / "runs" / "default"
    trajs = list(read_jsonl(run / "trajectories" / "rl" / "step_000002.jsonl"))
    assert len(trajs) == 6
    for t in trajs:
        assert t.meta.node_ids[0] == "r" and len(t.meta.node_ids) == len(t.turns) + 1
        assert len(set(t.meta.node_ids)) == len(t.meta.node_ids)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    assert len(rl) == 2 and all(r["branch/leaves"] == 3 and 1 <= r["branch/initial"] <= 3 for r in rl)


def test_lockstep_rounds_do_not_stall_a_barrier_batcher(smol_format):
    """Under the barrier batcher (a batch runs when every live trajectory waits for a generation: the hf
    backend's sync scheduling) the rounds of several trees complete, with requests batched together."""
    from tirl.backends.batching import BarrierBatcher

    scripted = ScriptedBackend(smol_format.tokenizer, calls_then_answer, entropies=by_turn(1.0, 2.0))

    class Batched:
        def __init__(self):
            self.batcher = BarrierBatcher(lambda rs: [asyncio.run(scripted.generate(r)) for r in rs], 3)
            self.requests = scripted.requests

        async def generate(self, request):
            return await self.batcher.submit(request)

        def participant(self):
            return self.batcher.participant()

    ctx = _ctx(smol_format, k=6, stall_timeout_s=20)
    ctx.backend = Batched()
    out = _run(EntropyBranch(), ctx, _problems(3))
    assert [len(g.trajectories) for g in out.groups] == [6, 6, 6] and out.metrics["branch/branches"] > 0
    assert ctx.backend.batcher.batches_run < len(scripted.requests)  # requests were batched together
