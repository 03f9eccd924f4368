"""The `hf` backend: transformers generation in-process, batched across concurrent trajectories
(continuously by default, `continuous.py`; batch-synchronously with scheduling="sync", `batching.py`).

It owns its own copy of the policy in the generation dtype (bfloat16 where the hardware runs it fast),
refreshed from the trainer's weights by `update_weights` after every optimizer step.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import torch

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.batching import BarrierBatcher
from tirl.backends.continuous import ContinuousBatcher
from tirl.backends.hf_engine import HFEngine


class HFBackend:
    """Generator over a transformers causal LM (see module docstring)."""

    def __init__(self, model, tokenizer, stop_token_ids: list[int], max_context: int, max_batch_size: int = 64,
                 scheduling: str = "async", keep_kv: bool = True):
        """`scheduling`: async (continuous batching: a turn joins the running batch when it is ready and
        is answered when it ends) or sync (barrier: a batch runs when every live trajectory waits, and
        answers when all of it is done). `keep_kv`: a trajectory's next turn continues from the cache its
        previous turn left instead of prefilling the whole conversation again (either scheduling)."""
        model.eval()
        self.model = model
        self.engine = HFEngine(model, tokenizer, stop_token_ids, max_context,
                               kv_entries=max_batch_size if keep_kv else 0)
        if scheduling == "async":
            self.batcher = ContinuousBatcher(self.engine, max_batch_size)
        elif scheduling == "sync":
            self.batcher = BarrierBatcher(self.engine.generate_batch, max_batch_size)
        else:
            raise ValueError(f"scheduling must be 'async' or 'sync', got {scheduling!r}")
        self.scheduling = scheduling

    async def generate(self, request: GenerationRequest) -> Completion:
        return await self.batcher.submit(request)

    def participant(self) -> AbstractAsyncContextManager:
        return self.batcher.participant()

    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Copy new weights in (cast to this model's dtype); every parameter must be present."""
        self.engine.kept.clear()  # caches kept across turns were computed by the old weights
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if not _is_tied(self.model, k)]:
            raise ValueError(f"weight update does not match the generation model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def metrics_snapshot(self):
        return self.engine.tokens_generated, replace(self.engine.stats)

    def metrics_since(self, snapshot) -> dict[str, float]:
        tokens, stats = snapshot
        return {"gen/tokens": float(self.engine.tokens_generated - tokens), **self.engine.stats.as_metrics(stats)}

    def close(self) -> None:
        self.batcher.close()


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
