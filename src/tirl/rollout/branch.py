"""Entropy-guided branching (ARPO / AEPO, reference 4.5): fork a path where a tool result made the model unsure.

A group is a rollout tree with k = `rollout.group_size` leaves (every path ends as one leaf; a failed
path still counts as one). It is built in four parts:

1. Initial samples. With `initial` set, m = `initial` independent paths start from the prompt (ARPO).
   Otherwise entropy pre-monitoring (AEPO) chooses m: the first path (the probe) plays its first turn
   and, if that turn called a tool, the turn after the tool result; with H_root the mean entropy of
   its first `probe_tokens` sampled tokens after the prompt and H_tool that of the first tokens after
   the tool result,
       m = clamp(floor(k * sigmoid(beta * (H_root - H_tool)) + 1/2), 1, k)
   (rounding half up, so beta -> 0 gives m = k/2 for even k). A probe without a tool result (or that
   failed) gives no H_tool: then H_tool = H_root, i.e. m = k/2. The probe is initial path 0 and goes on
   like the others; the other m - 1 start once m is known. `initial`, when set, takes precedence and no
   probe is played.
2. Branching, with the k - m leaves left. Paths are played in lockstep rounds of one turn each. When a
   path has played turn t+1 after turn t returned tool results (forks happen only after tool calls),
   it decides at that tool step, from
       H_t  = mean entropy of the first `probe_tokens` sampled tokens of turn t+1 (after the result),
       H_init = the same over the path's turn 0 (the start of its answer; forks inherit it),
       dH = normalise(H_t - H_init) = clip((H_t - H_init) / max(H_init, 1e-6), -1, 1)   (relative change),
       P_t = (alpha + gamma * dH) * (1 - P(l)),   P(l) = min(penalty * l, 1),
   where l counts the path's consecutive branchings. If P_t > threshold and leaves are left, the node of
   turn t gets Z = `branch_factor` children: the path's own turn t+1 and min(Z - 1, leaves left) forks
   that share turns 0..t (tokens included) and sample turn t+1 anew; every child has l + 1. Otherwise
   l = 0. Decisions within a round are taken in path order (creation order), so which path gets the
   last leaves is fixed: given the entropies, the tree is deterministic.
3. Unused budget. When every path has ended and fewer than k leaves exist (no high-entropy tool steps),
   fresh independent samples from the prompt make up the difference (played then, as only then is the
   unused budget known): a group always has k leaves, of which failed ones are recorded and left out.
4. Tree bookkeeping (shared with the `tree` strategy): `meta.node_ids[0] == "r"` (the prompt) and
   `meta.node_ids[j + 1]` is the node holding turn j (its sampled tokens and its observations). The
   children of a node N are "N.0" (the continuation of the path that made N), "N.1".. (forks), and the
   root's children "r.0", "r.1".. are the independent samples in creation order. Two leaves share turn
   j's tokens iff their node_ids[j + 1] are equal. `TrajectoryGroup.edges` lists every (parent, child)
   of the kept leaves' paths, in first-visit order.

Where this departs from the papers, on purpose:
- ARPO draws the decision at random (a uniform draw shifted by w*dH is compared with tau); here the
  score itself is compared with the threshold, so the tree depends on the entropies only (and the sampling seeds).
  With the defaults (alpha = tau = 0.5) a path with l = 0 branches exactly when its entropy rises.
- ARPO normalises entropies of the top-20 log-probs by log 20 and subtracts; the backends here give the
  full-vocabulary entropy, so dH is the relative change, clipped to [-1, 1] (scale free).
- AEPO averages H_tool over a whole pre-monitoring rollout; here it is the probe's first tool result,
  so that the probe can be a leaf of the tree.
- The entropy of the first tokens after a tool result is read from the path's own next turn; forks are
  made from the state before that turn. No extra generation is spent on probing.

Seeds: path i of group g has key (g, i) and seed `ctx.seed_for((g, i))` (initial paths thus sample
what `flat` would); forks take the next free index in decision order. Nothing else is random.

Metrics (means over the step's groups): `branch/initial` (m), `branch/branches` (nodes that branched),
`branch/leaves` (paths, failed included), `branch/fresh` (leaves spent on fresh samples), and
`branch/delta_entropy` (mean dH over all decisions, when any).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tirl.errors import ConfigError, RolloutError
from tirl.rollout.agent import Episode, finish, fork, is_failed, play_turn, record_error, start_episode
from tirl.rollout.groups import STRATEGIES, RolloutContext, Stateless, StrategyOutput
from tirl.rollout.tree import tree_edges
from tirl.tasks.base import Problem
from tirl.types import Trajectory, TrajectoryMeta

ROOT = "r"
"""Node id of the prompt."""
EPS = 1e-6
"""Floor of H_init in the relative entropy change."""


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def initial_samples(k: int, beta: float, h_root: float, h_tool: float) -> int:
    """m = clamp(floor(k * sigmoid(beta * (H_root - H_tool)) + 1/2), 1, k): AEPO's global sampling budget."""
    return min(k, max(1, math.floor(k * sigmoid(beta * (h_root - h_tool)) + 0.5)))


def normalised_change(h_t: float, h_init: float) -> float:
    """dH = clip((H_t - H_init) / max(H_init, 1e-6), -1, 1): the relative entropy change."""
    return max(-1.0, min(1.0, (h_t - h_init) / max(h_init, EPS)))


def branch_score(dh: float, streak: int, alpha: float, gamma: float, penalty: float) -> float:
    """P_t = (alpha + gamma * dH) * (1 - min(penalty * l, 1)), with l = `streak`."""
    return (alpha + gamma * dh) * (1.0 - min(penalty * streak, 1.0))


@dataclass
class Path:
    """One root-to-leaf path of the tree while it is being played."""

    ep: Episode
    index: int
    """Creation order within the group: the leaf's `sample_index` and the last part of its key."""
    node_ids: list[str]
    """"r", then the node of each turn played (see the module docstring)."""
    child: int
    """Which child of `node_ids[-1]` the next turn opens."""
    streak: int = 0
    """l: consecutive branchings on this path."""
    decided: int = -1
    """Last tool step whose branching decision is made (a fork must not decide its parent's step again)."""
    before: Episode | None = None
    """A copy of the episode from before its last turn: what forks continue from."""
    played: bool = False
    """Whether the last round added a turn."""
    h_init: float | None = None
    """Mean entropy of the first tokens of turn 0."""
    closed: bool = False
    """Whether its env is closed (or it never got one) and the watchdog told it is done."""


@STRATEGIES.register("entropy_branch")
class EntropyBranch(Stateless):
    """ARPO/AEPO entropy-guided branching at tool results: k = `rollout.group_size` leaves per problem."""

    makes_trees = True
    """Its groups are trees (tree estimators such as `portool` need this)."""

    def __init__(self, initial: int | None = None, branch_factor: int = 2, probe_tokens: int = 10,
                 alpha: float = 0.5, beta: float = 0.2, gamma: float = 0.2, penalty: float = 0.2,
                 threshold: float = 0.5):
        """Settings as in `EntropyBranchConfig`; the module docstring gives the formulas."""
        for name, value, least in (("initial", initial, 1), ("branch_factor", branch_factor, 2),
                                   ("probe_tokens", probe_tokens, 1)):
            if value is not None and value < least:
                raise ValueError(f"{name}={value}: must be at least {least}")
        if penalty < 0:
            raise ValueError(f"penalty={penalty}: must be at least 0")
        self.initial, self.branch_factor, self.probe_tokens = initial, branch_factor, probe_tokens
        self.alpha, self.beta, self.gamma, self.penalty, self.threshold = alpha, beta, gamma, penalty, threshold

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        k = ctx.spec.group_size
        if self.initial is not None and self.initial > k:
            raise ConfigError(f"rollout.entropy_branch.initial={self.initial} is more than rollout.group_size={k} "
                              "(the leaves of a tree)")
        trees = [BranchTree(self, p, gi, ctx) for gi, p in enumerate(problems)]
        results = await asyncio.gather(*(t.run() for t in trees))
        out = StrategyOutput(groups=[])
        for tree, trajs in zip(trees, results):
            out.failed += [t for t in trajs if is_failed(t)]
            ok = [t for t in trajs if not is_failed(t)]
            if ok:
                out.groups.append(await ctx.score(ok, tree.problem, tree.group_id,
                                            edges=tree_edges(ok)))
        out.metrics.update(tree_metrics(trees))
        return out


def tree_metrics(trees: Sequence[BranchTree]) -> dict[str, float]:
    """`branch/*` metrics of a step (means per group; dH over every decision)."""
    if not trees:
        return {}
    n = len(trees)
    out = {"branch/initial": sum(t.m for t in trees) / n, "branch/branches": sum(t.branches for t in trees) / n,
           "branch/leaves": sum(len(t.paths) for t in trees) / n, "branch/fresh": sum(t.fresh for t in trees) / n}
    dhs = [d for t in trees for d in t.delta_entropies]
    if dhs:
        out["branch/delta_entropy"] = sum(dhs) / len(dhs)
    return out


class BranchTree:
    """The rollout tree of one problem (one group), played round by round."""

    def __init__(self, cfg: EntropyBranch, problem: Problem, gi: int, ctx: RolloutContext):
        self.cfg, self.problem, self.gi, self.ctx = cfg, problem, gi, ctx
        self.k = ctx.spec.group_size
        self.group_id = f"{ctx.step}-{gi}"
        self.paths: list[Path] = []
        self.roots = 0
        """Children of the root so far (independent samples)."""
        self.m = 0
        self.branches = 0
        self.fresh = 0
        self.delta_entropies: list[float] = []

    @property
    def left(self) -> int:
        """Leaves not yet given to a path."""
        return self.k - len(self.paths)

    async def run(self) -> list[Trajectory]:
        """Play the tree to its end; its leaves as trajectories (rewards not yet set), in index order."""
        try:
            await self._initial()
            while True:
                active = [p for p in self.paths if not p.ep.done]
                if not active:
                    if self.left <= 0:
                        break
                    self.fresh += self.left
                    await self._start(self.left)
                    continue
                await self._play(active)
                await self._branch(active)
        finally:
            await asyncio.gather(*(self._close(p) for p in self.paths if not p.closed))
        return [self._leaf(p) for p in self.paths]

    async def _initial(self) -> None:
        """Start the m initial paths, playing the probe first under pre-monitoring."""
        if self.cfg.initial is not None:
            self.m = self.cfg.initial
            await self._start(self.m)
            return
        [probe] = await self._start(1)
        await self._play([probe])
        if probe.played and not probe.ep.done and probe.ep.turns[-1].tool_results:
            await self._play([probe])
        ep = probe.ep  # complete turns only, also when it failed: entropies[j] belongs to turns[j]
        if ep.turns:
            h_root = self._probe(ep, 0)
            h_tool = self._probe(ep, 1) if len(ep.turns) > 1 else h_root
            self.m = initial_samples(self.k, self.cfg.beta, h_root, h_tool)
        else:
            self.m = initial_samples(self.k, 0.0, 0.0, 0.0)
        await self._start(self.m - 1)
        await self._branch([probe])  # after the initial paths: the branching budget is k - m

    async def _start(self, n: int) -> list[Path]:
        """n new independent paths (children of the root), reset and ready for turn 0."""
        new = []
        for _ in range(n):
            index, child = len(self.paths), self.roots
            self.roots += 1
            path = Path(self._blank(index), index, [ROOT], child)
            self.paths.append(path)
            new.append(path)
        await asyncio.gather(*(self._reset(p) for p in new))
        return new

    async def _reset(self, path: Path) -> None:
        try:
            path.ep = await start_episode(path.ep.env, self.ctx.fmt, path.ep.meta, path.ep.seed, path.ep.key)
        except Exception as e:  # noqa: BLE001 - recorded on the path, counted by the caller
            record_error(path.ep, e)

    def _blank(self, index: int) -> Episode:
        """An episode of a fresh env, not yet reset (what a failure before the first turn is recorded on)."""
        key = (self.gi, index)
        meta = TrajectoryMeta(task_id=self.problem.id, group_id=self.group_id, sample_index=index,
                              step=self.ctx.step)
        return Episode(self.ctx.make_env(self.problem), meta, self.ctx.seed_for(key), key, [], [])

    async def _play(self, paths: Sequence[Path]) -> None:
        """One turn of each path, concurrently."""
        await asyncio.gather(*(self._play_one(p) for p in paths))

    async def _play_one(self, path: Path) -> None:
        ep, ctx = path.ep, self.ctx
        path.before, turns = copy_episode(ep), len(ep.turns)
        # participant per turn, not per path: a path that waits for the rest of its round is not about
        # to generate, so a barrier batcher must not hold other trajectories' requests back for it
        await play_turn(ep, ctx.backend, ctx.fmt, ctx.spec.sampling, ctx.spec.limits, ctx.progress,
                        want_entropies=True)
        path.played = len(ep.turns) > turns
        if path.played:
            path.node_ids.append(f"{path.node_ids[-1]}.{path.child}")
            path.child = 0
        if ep.done:
            await self._close(path)

    async def _branch(self, paths: Sequence[Path]) -> None:
        """Take the branching decisions of `paths` in order, then make the forks they asked for."""
        forks: list[tuple[Path, int, int]] = []
        for path in paths:
            for child in range(1, self._decide(path, self.left - len(forks)) + 1):
                forks.append((path, child, len(self.paths) + len(forks)))
        made = await asyncio.gather(*(self._fork(parent, child, index) for parent, child, index in forks))
        self.paths += made

    def _decide(self, path: Path, left: int) -> int:
        """The decision at the tool step `path` just resolved: how many forks to make (0: none), with `left`
        leaves still free."""
        ep = path.ep
        t = len(ep.turns) - 2
        if not path.played or ep.error is not None or t < 0 or t <= path.decided or not ep.turns[t].tool_results:
            return 0
        path.decided = t
        if path.h_init is None:
            path.h_init = self._probe(ep, 0)
        dh = normalised_change(self._probe(ep, t + 1), path.h_init)
        self.delta_entropies.append(dh)
        score = branch_score(dh, path.streak, self.cfg.alpha, self.cfg.gamma, self.cfg.penalty)
        if score <= self.cfg.threshold or left <= 0:
            path.streak = 0
            return 0
        self.branches += 1
        path.streak += 1
        return min(self.cfg.branch_factor - 1, left)

    async def _fork(self, parent: Path, child: int, index: int) -> Path:
        """Path `index`: `parent` as it was before its last turn, opening child `child` of the node it stood at.

        A fork that cannot be made (its env fails to build, reset or replay) is a failed path.
        """
        base = parent.before
        key = (self.gi, index)
        meta = TrajectoryMeta(task_id=self.problem.id, group_id=self.group_id, sample_index=index,
                              step=self.ctx.step)
        seed = self.ctx.seed_for(key)
        path = Path(dataclasses.replace(copy_episode(base), meta=meta, seed=seed, key=key), index,
                    parent.node_ids[:len(base.turns) + 1], child, streak=parent.streak, decided=parent.decided,
                    h_init=parent.h_init, closed=True)
        try:
            env = self.ctx.make_env(self.problem)
            path.ep.env, path.closed = env, False
            path.ep = await fork(base, env, meta, seed, key)
        except Exception as e:  # noqa: BLE001 - recorded on the path, counted by the caller
            record_error(path.ep, e)
            await self._close(path)
        return path

    def _probe(self, ep: Episode, turn: int) -> float:
        """Mean entropy of the first `probe_tokens` sampled tokens of `turn`."""
        entropies = ep.entropies[turn]
        if not entropies:
            raise RolloutError(f"rollout.strategy=entropy_branch needs token entropies, and the generation backend "
                               f"({type(self.ctx.backend).__name__}) returned none for turn {turn} of trajectory "
                               f"{ep.key}: use a backend that reports them (backend.name=hf)")
        head = entropies[:self.cfg.probe_tokens]
        return sum(head) / len(head)

    async def _close(self, path: Path) -> None:
        """Tell the watchdog `path` is done and close its env (once)."""
        self.ctx.progress.done(path.ep.key)
        if path.closed:
            return
        path.closed = True
        try:
            await path.ep.env.close()
        except Exception as e:  # noqa: BLE001 - a path whose env cannot close is recorded as failed
            if path.ep.error is None:
                record_error(path.ep, e)

    def _leaf(self, path: Path) -> Trajectory:
        path.ep.meta = dataclasses.replace(path.ep.meta, node_ids=tuple(path.node_ids[:len(path.ep.turns) + 1]))
        return finish(path.ep, self.ctx.fmt, self.ctx.spec.check)


def copy_episode(ep: Episode) -> Episode:
    """A copy of `ep` whose token, turn and message lists are its own (the env is shared, not copied)."""
    return dataclasses.replace(ep, prompt_ids=list(ep.prompt_ids), messages=list(ep.messages),
                               response=list(ep.response), mask=list(ep.mask), logprobs=list(ep.logprobs),
                               turns=list(ep.turns), entropies=list(ep.entropies), replay=list(ep.replay))
