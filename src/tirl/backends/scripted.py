"""A backend that replays scripted text: deterministic rollouts for tests and env debugging.

The script maps each request to the text the "model" writes; the text is tokenised and then cut
exactly where a real backend would stop (eos token, stop string, token budget), so everything
downstream (masks, parsing, budgets) behaves as with a real model. Entropies, for requests that ask
for them, come from a second script (`entropies`), so that entropy-guided strategies can be tested
with values chosen by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.hf_engine import finish_reason

Script = Callable[[GenerationRequest, int], str]
"""(request, index of this call within the trajectory's turns) -> text to emit."""
EntropyScript = Callable[[GenerationRequest, int], float | Sequence[float]]
"""(request, turn) -> entropy (nats) of every sampled position (one number), or per position (the last
value repeats past the end of the sequence)."""


class ScriptedBackend:
    """Replays `script`; every token gets log-probability `logprob`.

    With `entropies` (a number, or an `EntropyScript`), a request with `want_entropies` gets one entropy
    per sampled token; without it, no entropies come back (like a backend that cannot compute them).
    """

    def __init__(self, tokenizer: Any, script: Script | list[str], stop_token_ids: list[int] | None = None,
                 logprob: float = -0.5, entropies: EntropyScript | float | None = None):
        self.tokenizer = tokenizer
        self.script = script
        self.stop_token_ids = frozenset(stop_token_ids or [tokenizer.eos_token_id])
        self.logprob = logprob
        self.entropies = entropies
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> Completion:
        turn = len(request.key) and request.key[-1]
        self.requests.append(request)
        text = self.script[turn] if isinstance(self.script, list) else self.script(request, turn)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out: list[int] = []
        finish = "length"
        for tok in ids:
            out.append(tok)
            reason = finish_reason(out, request.max_new_tokens, self.stop_token_ids, request.stop_strings,
                                   self.tokenizer)
            if reason is not None:
                finish = reason
                break
        entropies = self._entropies(request, turn, len(out)) if request.want_entropies else ()
        return Completion(tuple(out), tuple([self.logprob] * len(out)), finish, entropies)

    def _entropies(self, request: GenerationRequest, turn: int, n: int) -> tuple[float, ...]:
        if self.entropies is None:
            return ()
        value = self.entropies(request, turn) if callable(self.entropies) else self.entropies
        if isinstance(value, (int, float)):
            return (float(value),) * n
        values = [float(v) for v in value]
        if not values:
            raise ValueError(f"entropy script gave no values for request {request.key}")
        return tuple(values[:n] + [values[-1]] * max(0, n - len(values)))

    @asynccontextmanager
    async def participant(self):
        yield

    def update_weights(self, state_dict) -> None:
        pass
