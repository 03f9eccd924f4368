"""PORTool credit assignment (reference 4.1) and training shared tree steps once.

Hand values: the reference's root with children a (leaves correct, correct) and b (wrong, wrong);
three siblings; the eta bonus; omega at its ends. Dedup: each shared token is trained once, in one
row, with the mean advantage of the rows that hold it: the gradient of the update on a tree group
equals the gradient of training its distinct steps once, each in its own context.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tirl.algorithms import (ADVANTAGES, AdvantageInput, NeedsTreeError, TreeStructure, mean_over_sharing_rows,
                             outcome_token_rewards, owner_mask)
from tirl.algorithms.tree import fork_advantages, membership, step_rewards
from tirl.errors import ConfigError
from tirl.trainer.update import UpdateSettings, advantages_for, rl_update
from tirl.types import StopReason, ToolResult, ToolStatus, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn

# The reference tree: root 0 -> a (1), b (2); a -> a0 (3), a1 (4); b -> b0 (5), b1 (6).
# Each leaf row holds 2 tokens of its first step and 1 token of its second.
PARENT = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
NODES = torch.tensor([[1, 1, 3], [1, 1, 4], [2, 2, 5], [2, 2, 6]])


def tree_input(rewards, tools_ok=None, node=NODES, parent=PARENT, groups=None) -> AdvantageInput:
    mask = torch.ones(node.shape, dtype=torch.float32)
    ok = torch.ones(parent.shape[0], dtype=torch.bool) if tools_ok is None else torch.tensor(tools_ok)
    group_ids = torch.zeros(node.shape[0], dtype=torch.long) if groups is None else torch.tensor(groups)
    return AdvantageInput(outcome_token_rewards(torch.tensor(rewards, dtype=torch.float32), mask), mask, group_ids,
                          tree=TreeStructure(node, parent, ok))


def test_reference_hand_value_fork_advantage():
    """4.1: eta=0 -> R(a)=1, R(b)=0, A_fork=+-0.7071; the leaves' siblings are equal -> A_fork=0."""
    reward, has_leaf = step_rewards(torch.tensor([1.0, 1.0, 0.0, 0.0]), membership(NODES, 7),
                                    torch.ones(7, dtype=torch.bool), eta=0.0)
    assert_close(reward, torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    assert has_leaf.tolist() == [False, True, True, True, True, True, True]
    fork = fork_advantages(reward, PARENT, has_leaf)
    assert_close(fork, torch.tensor([0.0, 1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    adv, returns = ADVANTAGES.get("portool")(tree_input([1, 1, 0, 0]), eta=0.0, omega=1.0)
    assert_close(adv[:, 0], torch.tensor([0.70711, 0.70711, -0.70711, -0.70711]), atol=1e-5, rtol=0)
    assert_close(adv[:, 2], torch.zeros(4))
    assert_close(returns, adv)


def test_blend_with_trajectory_advantage():
    """omega=0.5: first step 0.5*0.7071 + 0.5*0.8660 = 0.7866, second step 0.5*0 + 0.5*0.8660 = 0.4330
    (A_traj: GRPO of [1, 1, 0, 0] = +-0.8660, unbiased std)."""
    adv, _ = ADVANTAGES.get("portool")(tree_input([1, 1, 0, 0]), eta=0.0)
    assert_close(adv, torch.tensor([[0.78657] * 2 + [0.43301]] * 2 + [[-0.78657] * 2 + [-0.43301]] * 2),
                 atol=1e-5, rtol=0)
    grpo, _ = ADVANTAGES.get("grpo")(tree_input([1, 1, 0, 0]))
    assert_close(ADVANTAGES.get("portool")(tree_input([1, 1, 0, 0]), omega=0.0)[0], grpo)


def test_three_siblings_and_the_tool_bonus():
    """Siblings with R = 1, 0.5, 0 (mean 0.5, unbiased std 0.5) -> A_fork = +1, 0, -1. With leaf rewards
    all 0 and eta=0.1, only the tool bonus differs: R = 0.1, 0.1, 0 -> mean 1/15, std 0.0577 -> +0.577,
    +0.577, -1.155 (one sibling's call failed)."""
    parent = torch.tensor([-1, 0, 0, 0])
    node = torch.tensor([[1], [1], [2], [2], [3], [3]])
    adv, _ = ADVANTAGES.get("portool")(tree_input([1, 1, 1, 0, 0, 0], node=node, parent=parent), eta=0.0, omega=1.0)
    assert_close(adv[:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, -1.0]), atol=1e-5, rtol=0)
    adv, _ = ADVANTAGES.get("portool")(tree_input([0] * 6, [True, True, True, False], node=node, parent=parent),
                                       eta=0.1, omega=1.0)
    assert_close(adv[:, 0], torch.tensor([0.57735, 0.57735, 0.57735, 0.57735, -1.1547, -1.1547]), atol=1e-4, rtol=0)


def test_single_child_and_separate_trees():
    """A step without siblings gets A_fork = 0; A_traj is computed per tree (group id), and a first step's
    siblings are only its own tree's first steps."""
    parent = torch.tensor([-1, 0, 1, -1, 3, 3])  # tree 0: root 0 -> 1 -> 2 ; tree 1: root 3 -> 4, 5
    node = torch.tensor([[1, 2], [1, 2], [4, 4], [5, 5]])
    adv, _ = ADVANTAGES.get("portool")(tree_input([1, 0, 1, 0], node=node, parent=parent, groups=[0, 0, 1, 1]),
                                       eta=0.0, omega=1.0)
    assert_close(adv[:2], torch.zeros(2, 2))
    assert_close(adv[2:, 0], torch.tensor([0.70711, -0.70711]), atol=1e-5, rtol=0)


def test_portool_needs_a_tree():
    mask = torch.ones(2, 2)
    flat = AdvantageInput(outcome_token_rewards(torch.tensor([1.0, 0.0]), mask), mask, torch.zeros(2, dtype=torch.long))
    with pytest.raises(NeedsTreeError, match="needs rollout trees"):
        ADVANTAGES.get("portool")(flat)
    half = tree_input([1, 0, 1, 0], node=torch.tensor([[1, 1, 3], [1, 1, 4], [-1, -1, -1], [-1, -1, -1]]))
    with pytest.raises(NeedsTreeError, match="some rows are not in a tree"):
        ADVANTAGES.get("portool")(half)
    with pytest.raises(ValueError, match="omega"):
        ADVANTAGES.get("portool")(tree_input([1, 1, 0, 0]), omega=1.5)
    with pytest.raises(ValueError, match="names node 9"):
        TreeStructure(torch.tensor([[9]]), PARENT, torch.ones(7, dtype=torch.bool))


def test_dedup_helpers():
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [7.0, 7.0, 7.0]])
    node = torch.tensor([[1, 1, 2], [1, 1, 3], [-1, 4, 4]])
    assert_close(mean_over_sharing_rows(values, node), torch.tensor([[2.0, 3.0, 3.0], [2.0, 3.0, 5.0],
                                                                     [7.0, 7.0, 7.0]]))
    assert owner_mask(node).tolist() == [[True, True, True], [False, False, True], [True, True, True]]


# ----------------------------------------------------------------------------- trained once

PROMPT = (5, 6, 7)
A_STEP, A_OBS, X_STEP, Y_STEP, B_STEP = (10, 11), (12,), (20, 21), (30,), (40, 41, 42)


def _leaf(response, mask, turns, path, reward, k):
    return Trajectory(PROMPT, tuple(response), tuple(mask), tuple(-1.0 if m else 0.0 for m in mask), tuple(turns), (),
                      StopReason.ANSWERED, TrajectoryMeta("t", "g", k, node_ids=path), reward=reward)


def hand_tree() -> TrajectoryGroup:
    """Leaves a->x (reward 1), a->y (0), b (1); step a = 2 sampled tokens + 1 observation token."""
    ok = (ToolResult("c", "calculator", "2", ToolStatus.OK),)
    a = Turn(0, 2, 3, "", "stop", tool_results=ok)
    x = _leaf(A_STEP + A_OBS + X_STEP, (1, 1, 0, 1, 1), [a, Turn(3, 5, 5, "", "eos")], ("r", "r.0", "r.0.0"), 1.0, 0)
    y = _leaf(A_STEP + A_OBS + Y_STEP, (1, 1, 0, 1), [a, Turn(3, 4, 4, "", "eos")], ("r", "r.0", "r.0.1"), 0.0, 1)
    b = _leaf(B_STEP, (1, 1, 1), [Turn(0, 3, 3, "", "eos")], ("r", "r.1"), 1.0, 2)
    return TrajectoryGroup("g", "t", (x, y, b))


def test_shared_step_is_kept_in_one_row_with_the_mean_advantage():
    batch = advantages_for([hand_tree()], UpdateSettings())
    g = 1 / math.sqrt(3)  # GRPO of [1, 0, 1]: mean 2/3, unbiased std 1/sqrt(3) -> [+0.577, -1.155, +0.577]
    assert_close(batch.advantages, torch.tensor([[-g / 2, -g / 2, 0, g, g], [-g / 2, -g / 2, 0, -2 * g, 0],
                                                 [g, g, g, 0, 0]]), atol=1e-5, rtol=0)
    assert batch.mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 1, 0], [1, 1, 1, 0, 0]]  # loss masks as sampled
    assert batch.trained.tolist() == [[1, 1, 0, 1, 1], [0, 0, 0, 1, 0], [1, 1, 1, 0, 0]]
    assert int(batch.trained.sum()) == 8  # distinct sampled tokens: a 2, x 2, y 1, b 3


def test_flat_groups_are_untouched_and_portool_on_them_is_a_config_error():
    flat = TrajectoryGroup("f", "t", tuple(_leaf(B_STEP, (1, 1, 1), [Turn(0, 3, 3, "", "eos")], (), r, k)
                                           for k, r in enumerate([1.0, 0.0])))
    batch = advantages_for([flat], UpdateSettings())
    assert batch.train_mask is None and batch.trained is batch.mask
    with pytest.raises(ConfigError, match="algorithm.advantage=portool: .*rollout.strategy=tree"):
        advantages_for([flat], UpdateSettings(advantage="portool"))


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _distinct_steps_loss(model, advantages: dict[str, float], divide_by: float) -> torch.Tensor:
    """-sum over the distinct steps s of A_s * sum_{t in s, sampled} log pi(t) / divide_by, each step scored
    once in its own context: the policy-gradient loss at ratio 1 with every shared token counted once."""
    from tirl.trainer.forward import response_logprobs

    after_a = PROMPT + A_STEP + A_OBS
    steps = {"a": (PROMPT, A_STEP + A_OBS, (1, 1, 0)), "x": (after_a, X_STEP, (1, 1)), "y": (after_a, Y_STEP, (1,)),
             "b": (PROMPT, B_STEP, (1, 1, 1))}
    total = torch.zeros(())
    for name, (prompt, response, mask) in steps.items():
        logprobs = response_logprobs(model, [prompt], [response], [mask]).logprobs
        total = total - advantages[name] * logprobs.sum()
    return total / divide_by


@pytest.mark.parametrize("aggregation,divide_by", [("token-mean", 8.0), ("seq-mean-token-sum-norm", 5.0)])
def test_update_on_a_tree_equals_training_the_distinct_steps_once(tiny_model_dir, aggregation, divide_by):
    """SGD(lr=1) on the tree group moves the weights by minus the gradient of the distinct-steps loss.
    token-mean divides by the 8 distinct sampled tokens (10 with the shared step counted twice);
    seq-mean-token-sum-norm by the padded width, 5."""
    g = 1 / math.sqrt(3)
    reference = _model(tiny_model_dir)
    loss = _distinct_steps_loss(reference, {"a": -g / 2, "x": g, "y": -2 * g, "b": g}, divide_by)
    loss.backward()
    for micro in (1, 3):
        model = _model(tiny_model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        s = UpdateSettings(aggregation=aggregation, micro_batch_size=micro, max_grad_norm=None)
        metrics = rl_update(model, torch.optim.SGD(model.parameters(), lr=1.0), advantages_for([hand_tree()], s), s)
        assert metrics["train/tokens"] == 8.0
        for (n, p), ref in zip(model.named_parameters(), reference.parameters()):
            assert_close(before[n] - p.detach(), ref.grad, atol=2e-6, rtol=1e-4, msg=f"{aggregation} {n}")
