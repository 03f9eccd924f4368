"""The generator contract shared by every backend (hf, openai, vllm).

A rollout asks for one continuation at a time (`generate`); the backend decides how requests of
concurrently running trajectories are batched. Completions carry the sampled token ids and their
sampling log-probabilities, so training never re-tokenises text (DESIGN.md invariant 1).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from tirl.types import FinishReason


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. The policy trained on is softmax(logits / temperature)."""

    temperature: float = 1.0
    """0 means greedy (argmax); log-probs are then reported at temperature 1."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off). Reported log-probs are of the untruncated distribution."""


@dataclass(frozen=True)
class GenerationRequest:
    """One continuation of one trajectory."""

    prompt_ids: tuple[int, ...]
    """Everything so far: prompt, earlier turns and observations."""
    max_new_tokens: int
    """Token budget of this continuation (> 0)."""
    stop_strings: tuple[str, ...] = ()
    """Stop as soon as the generated text contains one of these (the token that completes it is kept)."""
    sampling: SamplingParams = SamplingParams()
    """Temperature and top-p."""
    seed: int = 0
    """Seeds this request's own random stream, so samples do not depend on batch composition."""
    key: tuple = ()
    """Sort key that fixes the order of requests inside a batch (determinism)."""
    messages: tuple[Any, ...] = ()
    """The conversation so far as `tirl.types.Message`s (what `prompt_ids` renders); only backends that
    talk to a chat endpoint use it."""
    tools: tuple[dict, ...] = ()
    """OpenAI-style schemas of the tools shown to the model (chat endpoints only)."""
    want_entropies: bool = False
    """Also return the entropy of each sampled position (entropy-guided branching needs it)."""


@dataclass(frozen=True)
class Completion:
    """What the backend generated for one request."""

    token_ids: tuple[int, ...]
    """Sampled tokens, including the end-of-turn token or the token that completed a stop string."""
    logprobs: tuple[float, ...]
    """Sampling log-probability of each token in `token_ids`."""
    finish_reason: FinishReason
    """eos: an end-of-turn token; stop: a stop string; length: the budget ran out."""
    entropies: tuple[float, ...] = ()
    """Entropy (nats) of the sampling distribution at each position, when the request asked for it."""


class Generator(Protocol):
    """What the rollout needs from a backend."""

    async def generate(self, request: GenerationRequest) -> Completion:
        """Generate one continuation."""
        ...

    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Load new policy weights (after an optimizer step)."""
        ...

    def participant(self):
        """Async context manager a trajectory holds while it runs (lets batching backends wait for it)."""
        ...

    def metrics_snapshot(self) -> Any:
        """Opaque snapshot of cumulative counters (read back with `metrics_since`)."""
        ...

    def metrics_since(self, snapshot: Any) -> dict[str, float]:
        """Generation metrics since `snapshot`: counts under `gen/*` (incl. `gen/tokens`), clock readings
        under `time/*` and `speed/*`."""
        ...

    def close(self) -> None:
        """Release threads, connections and engines."""
        ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
