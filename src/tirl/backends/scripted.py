"""A backend that replays scripted text: deterministic rollouts for tests and env debugging.

The script maps each request to the text the "model" writes; the text is tokenised and then cut
exactly where a real backend would stop (eos token, stop string, token budget), so everything
downstream (masks, parsing, budgets) behaves as with a real model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.hf_engine import finish_reason

Script = Callable[[GenerationRequest, int], str]
"""(request, index of this call within the trajectory's turns) -> text to emit."""


class ScriptedBackend:
    """Replays `script`; every token gets log-probability `logprob`."""

    def __init__(self, tokenizer: Any, script: Script | list[str], stop_token_ids: list[int] | None = None,
                 logprob: float = -0.5):
        self.tokenizer = tokenizer
        self.script = script
        self.stop_token_ids = frozenset(stop_token_ids or [tokenizer.eos_token_id])
        self.logprob = logprob
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
        return Completion(tuple(out), tuple([self.logprob] * len(out)), finish)

    @asynccontextmanager
    async def participant(self):
        yield

    def update_weights(self, state_dict) -> None:
        pass
