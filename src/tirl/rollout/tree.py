"""PORTool tree rollouts (reference 4.1): n leaves per problem that share the steps they have in common.

Growing one tree (n = `rollout.group_size`, f = `branch_factor`, T_max = `max_depth`):

1. n first steps from the prompt (independent samples of turn 0).
2. At each depth, finished candidates become leaves (chosen uniformly without replacement when more
   finished than there are places left); exactly n - n_c unfinished candidates (n_c = leaves so far)
   are chosen, uniformly without replacement, and each proposes f children: the node's episode is
   forked (`fork`: own env, restored by replaying the assistant turns) and every child plays one turn.
   Forks therefore happen only at turn boundaries, after a turn whose tool calls left the episode
   open (an episode that answered or hit a limit is finished and never forked).
3. Depth limit, the forced finish: the tree's episodes run under the normal turn limits with
   `max_turns = min(rollout.max_turns, T_max)`. The candidates of the last depth thus play their last
   turn as any trajectory plays its last one, and end with the normal stop reason: `answered`, or
   `max_turns` when that turn still called a tool (its observations are not inserted). Nothing is
   left unfinished, so the depth loop ends with every leaf complete.

Candidates not chosen (finished surplus, unfinished ones beyond n - n_c) are dropped: they are on no
leaf's path and are not trained on. Selections use `random.Random(ctx.seed_for(("tree-select", group,
depth)))` over candidates in node-id order, and every step samples with its own seed
`ctx.seed_for(("tree", group, node_id))`, so a tree depends only on (seed, step, group).

Node ids (shared with `entropy_branch`): `meta.node_ids[0] == "r"` is the prompt and
`meta.node_ids[k + 1]` the node holding turn k (its sampled tokens and the observations after it);
a child of node x is `f"{x}.{j}"` (first steps: "r.0" .. "r.{n-1}"), so ids are unique in a group and
two leaves share turn k's tokens iff their `node_ids[k + 1]` are equal. `TrajectoryGroup.edges` lists
every (parent, child) of the leaves' paths (`tree_edges`). A node whose children stop before
playing a turn (its context, token or time budget is spent) becomes a leaf itself, with its own path
(once); an episode that stops before its first turn is a leaf with the path ("r",).

A step whose env or backend raises is recorded as a failed trajectory (never trained on) and its
branch ends; the tree then may have fewer than n leaves. Leaves are ordered by node id and scored
together as one group (`ctx.score(..., edges=...)`). Each episode holds `backend.participant()` only
while it plays a turn, so barrier batching never waits for an episode parked between depths.

Metrics: `tree/candidates` (candidate nodes: first steps and proposed children, where the children
that could not play a turn count once, as their parent finishing), `tree/nodes` (distinct steps on
the leaves' paths), `tree/step_sharing` (1 - nodes / leaf turns: the share of the leaves' steps that
are another leaf's step too, trained once).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tirl.rollout.agent import (Episode, TurnLimits, advance, finish, fork, play_turn, record_error,
                               start_episode)
from tirl.rollout.groups import STRATEGIES, RolloutContext, Stateless, StrategyOutput
from tirl.tasks.base import Problem
from tirl.types import Trajectory, TrajectoryGroup, TrajectoryMeta, TreeEdge

ROOT = "r"
"""Node id of every tree's root (the prompt; it holds no response tokens)."""


# ----------------------------------------------------------------------------- node ids


def child_id(parent: str, index: int) -> str:
    """Id of the `index`-th child proposed under node `parent` ("r.0.1" = child 1 of child 0 of the root)."""
    return f"{parent}.{index}"


def node_path(traj: Trajectory) -> tuple[str, ...]:
    """`traj`'s node ids, root first; raises ValueError unless it is a well-formed tree path
    (starts at the root, one node per turn)."""
    path = traj.meta.node_ids
    if not path or path[0] != ROOT or len(path) != len(traj.turns) + 1:
        raise ValueError(f"group {traj.meta.group_id} sample {traj.meta.sample_index}: node_ids {path} must start "
                         f"with {ROOT!r} and name one node per turn ({len(traj.turns)} turns)")
    return path


def is_tree(group: TrajectoryGroup) -> bool:
    """True when the group's trajectories come from a rollout tree (they carry node ids)."""
    return bool(group.edges) or any(t.meta.node_ids for t in group.trajectories)


def tree_edges(trajs: Iterable[Trajectory]) -> tuple[TreeEdge, ...]:
    """Every (parent, child) pair on the trajectories' node paths, once, in first-seen order."""
    seen: dict[TreeEdge, None] = {}
    for t in trajs:
        path = node_path(t)
        for parent, child in zip(path, path[1:]):
            seen.setdefault(TreeEdge(parent, child), None)
    return tuple(seen)


def node_spans(traj: Trajectory) -> list[tuple[str, str, int, int]]:
    """`(parent, node, start, end)` for each turn of `traj`: the node holding it, its parent, and the
    half-open span [gen_start, obs_end) of its tokens in `response_ids`."""
    path = node_path(traj)
    return [(path[k], path[k + 1], turn.gen_start, turn.obs_end) for k, turn in enumerate(traj.turns)]


def check_tree(group: TrajectoryGroup) -> None:
    """Raise ValueError unless `group` is a consistent tree: every trajectory has a node path, all share
    one prompt, each node has one parent and the same span and tokens (ids and loss mask) in every
    leaf that holds it (so, by induction over the path, two leaves that share a node share everything
    up to its end), and `edges` are exactly the pairs on the paths."""
    seen: dict[str, tuple] = {}
    for t in group.trajectories:
        if t.prompt_ids != group.trajectories[0].prompt_ids:
            raise ValueError(f"tree group {group.group_id}: sample {t.meta.sample_index} has another prompt")
        for parent, node, start, end in node_spans(t):
            own = (parent, start, end, t.response_ids[start:end], t.loss_mask[start:end])
            if seen.setdefault(node, own) != own:
                raise ValueError(f"tree group {group.group_id}: node {node!r} differs between leaves (parent, token "
                                 f"span or tokens); a shared node must be the same tokens in every leaf")
    if group.edges and set(group.edges) != set(tree_edges(group.trajectories)):
        raise ValueError(f"tree group {group.group_id}: edges do not match the leaves' node_ids")


def _order(path: Sequence[str]) -> tuple[int, ...]:
    """Sort key of a node path: its child indices as numbers ("r.10" after "r.2")."""
    return tuple(int(part) for part in path[-1].split(".")[1:])


# ----------------------------------------------------------------------------- strategy


@STRATEGIES.register("tree")
class Tree(Stateless):
    """PORTool rollout trees: `rollout.group_size` leaves per problem sharing prefixes (module docstring)."""

    makes_trees = True
    """Its groups are trees (tree estimators such as `portool` need this)."""

    def __init__(self, branch_factor: int = 2, max_depth: int | None = None):
        """`max_depth` (T_max, in turns) defaults to `rollout.max_turns`."""
        if branch_factor < 1:
            raise ValueError(f"branch_factor={branch_factor}: must be at least 1")
        if max_depth is not None and max_depth < 1:
            raise ValueError(f"max_depth={max_depth}: must be at least 1")
        self.branch_factor, self.max_depth = branch_factor, max_depth

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        grown = await asyncio.gather(*(self.grow(gi, p, ctx) for gi, p in enumerate(problems)))
        out = StrategyOutput(groups=[])
        candidates = 0
        for gi, (p, (leaves, failed, sampled)) in enumerate(zip(problems, grown)):
            out.failed += failed
            candidates += sampled
            if leaves:
                out.groups.append(await ctx.score(leaves, p, f"{ctx.step}-{gi}", edges=tree_edges(leaves)))
        out.metrics.update(tree_metrics(out.groups, candidates))
        return out

    def limits(self, limits: TurnLimits) -> TurnLimits:
        """The turn limits of the tree's episodes: the depth limit is a turn limit."""
        if self.max_depth is None or self.max_depth >= limits.max_turns:
            return limits
        return replace(limits, max_turns=self.max_depth)

    async def grow(self, gi: int, problem: Problem, ctx: RolloutContext
                   ) -> tuple[list[Trajectory], list[Trajectory], int]:
        """One tree: its leaves (ordered by node id, sample_index set), failed steps, steps sampled."""
        n, limits = ctx.spec.group_size, self.limits(ctx.spec.limits)
        meta = TrajectoryMeta(task_id=problem.id, group_id=f"{ctx.step}-{gi}", step=ctx.step)
        cands = await asyncio.gather(*(self._first_step(gi, problem, ctx, meta, child_id(ROOT, i), limits)
                                       for i in range(n)))
        leaves: list[Trajectory] = []
        failed: list[Trajectory] = []
        sampled, depth = 0, 0
        while cands:
            sampled += len(cands)
            cands = sorted(cands, key=lambda e: _order(e.meta.node_ids))
            failed += [await _close(e, ctx) for e in cands if e.error is not None]
            ok = [e for e in cands if e.error is None]
            rng = random.Random(ctx.seed_for(("tree-select", gi, depth)))
            chosen = select([e for e in ok if e.done], n - len(leaves), rng)
            frontier = select([e for e in ok if not e.done], n - len(leaves) - len(chosen), rng)
            leaves += await asyncio.gather(*(_close(e, ctx) for e in chosen))
            kept = {id(e) for e in chosen + frontier}
            await asyncio.gather(*(_close(e, ctx) for e in ok if id(e) not in kept))  # dropped candidates
            if not frontier:
                break
            grown = await asyncio.gather(*(self._expand(gi, problem, ctx, e, limits) for e in frontier))
            cands = [c for kids in grown for c in kids]
            depth += 1
        trajs = sorted(leaves, key=lambda t: _order(t.meta.node_ids))
        trajs = [dataclasses.replace(t, meta=replace(t.meta, sample_index=i)) for i, t in enumerate(trajs)]
        return trajs, failed, sampled

    async def _first_step(self, gi: int, problem: Problem, ctx: RolloutContext, meta: TrajectoryMeta, node: str,
                          limits: TurnLimits) -> Episode:
        """Turn 0 of a fresh episode, as node `node` under the root."""
        key = ("tree", gi, node)
        meta, seed, env = replace(meta, node_ids=(ROOT, node)), ctx.seed_for(key), ctx.make_env(problem)
        async with ctx.backend.participant():
            ep = None
            try:
                ep = await start_episode(env, ctx.fmt, meta, seed, key)
                await advance(ep, ctx.backend, ctx.fmt, ctx.spec.sampling, limits, ctx.progress)
            except Exception as e:  # noqa: BLE001 - recorded on the trajectory, counted by the caller
                ep = ep or Episode(env, meta, seed, key, [], [])
                record_error(ep, e)
            finally:
                ctx.progress.done(key)
        if not ep.turns:  # stopped (or failed) before its first turn: a path of the root alone
            ep.meta = replace(ep.meta, node_ids=(ROOT,))
        return ep

    async def _expand(self, gi: int, problem: Problem, ctx: RolloutContext, parent: Episode,
                      limits: TurnLimits) -> list[Episode]:
        """The f children of unfinished node `parent`, each after one turn. Children 1..f-1 are forks;
        child 0 continues in the parent's own episode and env (one replay fewer)."""
        path, turns = parent.meta.node_ids, len(parent.turns)
        ids = [child_id(path[-1], j) for j in range(self.branch_factor)]
        forks = await asyncio.gather(*(self._fork(gi, problem, ctx, parent, c) for c in ids[1:]))
        parent.key = ("tree", gi, ids[0])
        parent.seed, parent.meta = ctx.seed_for(parent.key), replace(parent.meta, node_ids=(*path, ids[0]))
        kids = [parent, *forks]
        await asyncio.gather(*(self._play(ctx, k, limits) for k in kids if k.error is None))
        return await _stopped_parent(kids, path, turns, ctx)

    async def _fork(self, gi: int, problem: Problem, ctx: RolloutContext, parent: Episode, node: str) -> Episode:
        """A copy of `parent` as node `node` in its own env (failed when the replay raises)."""
        key = ("tree", gi, node)
        meta = replace(parent.meta, node_ids=(*parent.meta.node_ids, node))
        seed, env = ctx.seed_for(key), ctx.make_env(problem)
        ctx.progress.mark(key, f"replaying {len(parent.replay)} turns into a fork", env.activity)
        try:
            return await fork(parent, env, meta, seed, key)
        except Exception as e:  # noqa: BLE001 - recorded on the trajectory, counted by the caller
            ep = Episode(env, meta, seed, key, [], [])
            record_error(ep, e)
            return ep
        finally:
            ctx.progress.done(key)

    async def _play(self, ctx: RolloutContext, ep: Episode, limits: TurnLimits) -> None:
        """One turn of `ep` (a failure is recorded on it)."""
        try:
            await play_turn(ep, ctx.backend, ctx.fmt, ctx.spec.sampling, limits, ctx.progress)
        finally:
            ctx.progress.done(ep.key)


async def _stopped_parent(kids: list[Episode], path: tuple[str, ...], turns: int, ctx: RolloutContext
                          ) -> list[Episode]:
    """Children that stopped without playing a turn (budget or context spent) are their parent finishing:
    the first keeps the parent's path as a finished candidate, the others are closed and dropped."""
    out, parent_done = [], False
    for k in kids:
        if k.error is None and k.done and len(k.turns) == turns:
            if parent_done:
                await _close(k, ctx)
                continue
            parent_done, k.meta = True, replace(k.meta, node_ids=path)
        out.append(k)
    return out


def select(items: list[Episode], k: int, rng: random.Random) -> list[Episode]:
    """`k` of `items` uniformly without replacement (all of them when there are no more than `k`)."""
    if k <= 0:
        return []
    return list(items) if len(items) <= k else rng.sample(items, k)


async def _close(ep: Episode, ctx: RolloutContext) -> Trajectory:
    """Close `ep`'s env and return its trajectory."""
    await ep.env.close()
    return finish(ep, ctx.fmt, ctx.spec.check)


def tree_metrics(groups: Sequence[TrajectoryGroup], candidates: int) -> dict[str, float]:
    """`tree/candidates`, `tree/nodes` and `tree/step_sharing` of a step's trees (see module docstring)."""
    nodes = sum(len(g.edges) for g in groups)
    steps = sum(len(t.turns) for g in groups for t in g.trajectories)
    return {"tree/candidates": float(candidates), "tree/nodes": float(nodes),
            "tree/step_sharing": 1.0 - nodes / steps if steps else 0.0}
