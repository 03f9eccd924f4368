"""The trajectory viewer's data: the trajectories the page shows, as plain JSON-ready values.

The page shows at most `per_step` trajectories of each RL step and `per_eval` of each eval stage,
picked round-robin over groups (RL) or over right/wrong answers (eval) so every prompt or outcome is
represented; the page states both caps and how many each step had. Tokens travel as ids plus one
shared `vocab` table of their decoded texts, so the page can shade each token by its loss mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tirl.errors import ConfigError
from tirl.report.data import RunData, pick_spread
from tirl.report.tokens import TokenTable
from tirl.types import Trajectory, Turn


@dataclass(frozen=True)
class ViewerLimits:
    """How many trajectories the page carries (its size grows with them)."""

    per_step: int = 16
    """Trajectories shown per RL step (trained and untrained together)."""
    per_eval: int = 32
    """Trajectories shown per eval stage."""

    def __post_init__(self):
        if self.per_step < 0 or self.per_eval < 0:
            raise ConfigError(f"trajectories per RL step and per eval stage must be >= 0, got {self.per_step} "
                              f"and {self.per_eval}")


def viewer_payload(run: RunData, limits: ViewerLimits, tokens: TokenTable | None) -> dict[str, Any]:
    """`{"sources", "trajs", "prompts", "vocab", "limits"}`: each source (an RL step or an eval stage)
    lists the indices of its shown trajectories in `trajs`; `vocab` maps token id (as a string) to text
    and is empty when `tokens` is None."""
    builder = _Builder(tokens)
    sources = []
    for st in run.steps:
        every = [(t, True) for t in st.trained] + [(t, False) for t in st.untrained]
        shown = pick_spread(every, limits.per_step, key=lambda tt: tt[0].meta.group_id)
        sources.append(builder.source(f"rl/{st.step}", f"RL step {st.step}", "rl", len(every), shown))
    for ev in run.evals:
        shown = pick_spread([(t, True) for t in ev.trajectories], limits.per_eval, key=lambda tt: tt[0].correct)
        sources.append(builder.source(f"eval/{ev.name}", f"eval {ev.name}", "eval", len(ev.trajectories), shown))
    vocab = {str(k): v for k, v in tokens.vocab.items()} if tokens else {}
    return {"sources": sources, "trajs": builder.trajs, "prompts": builder.prompts, "vocab": vocab,
            "limits": {"per_step": limits.per_step, "per_eval": limits.per_eval}}


class _Builder:
    """Accumulates trajectories and deduplicated prompts (a group's samples share one prompt)."""

    def __init__(self, tokens: TokenTable | None):
        self.tokens = tokens
        self.trajs: list[dict[str, Any]] = []
        self.prompts: list[list[dict[str, str]]] = []
        self._prompt_index: dict[str, int] = {}

    def source(self, id_: str, label: str, kind: str, total: int,
               shown: list[tuple[Trajectory, bool]]) -> dict[str, Any]:
        start = len(self.trajs)
        for t, trained in shown:
            self.trajs.append(self.trajectory(t, trained, id_))
        return {"id": id_, "label": label, "kind": kind, "total": total,
                "trajs": list(range(start, len(self.trajs)))}

    def trajectory(self, t: Trajectory, trained: bool, source: str) -> dict[str, Any]:
        out = {"source": source, "task": t.meta.task_id, "group": t.meta.group_id, "sample": t.meta.sample_index,
               "reward": t.reward, "components": dict(t.reward_components), "correct": t.correct,
               "stop": t.stop_reason.value, "trained": trained, "error": t.meta.error, "origin": t.meta.origin,
               "final": t.final_answer, "prompt": self._prompt(t), "n_prompt": len(t.prompt_ids),
               "n_sampled": t.num_sampled_tokens, "n_calls": len(t.tool_results),
               "n_errors": sum(1 for r in t.tool_results if not r.ok),
               "turns": [_turn(turn, t.turn_rewards[i] if i < len(t.turn_rewards) else None)
                         for i, turn in enumerate(t.turns)]}
        if self.tokens is not None:
            out["ids"] = list(t.response_ids)
            out["mask"] = "".join("1" if m else "0" for m in t.loss_mask)
            out["fix"] = {str(k): v for k, v in self.tokens.add(t.response_ids).items()}
        return out

    def _prompt(self, t: Trajectory) -> int:
        messages = []
        for m in t.messages:
            if m.role == "assistant":
                break
            messages.append({"role": m.role, "content": m.content})
        key = json.dumps(messages)
        if key not in self._prompt_index:
            self._prompt_index[key] = len(self.prompts)
            self.prompts.append(messages)
        return self._prompt_index[key]


def _turn(turn: Turn, reward: float | None) -> dict[str, Any]:
    return {"text": turn.text, "finish": turn.finish_reason, "span": [turn.gen_start, turn.gen_end, turn.obs_end],
            "calls": [{"id": c.id, "name": c.name, "args": json.dumps(c.arguments, ensure_ascii=False)}
                      for c in turn.tool_calls],
            "results": [{"call_id": r.call_id, "name": r.name, "status": r.status.value, "content": r.content,
                         "latency_s": r.latency_s} for r in turn.tool_results],
            "reward": reward}
