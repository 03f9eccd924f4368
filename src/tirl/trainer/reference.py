"""The reference policy of the KL penalty (reference 2.2).

Two kinds: a frozen copy of the starting weights (`copy`), or the policy itself with its LoRA adapter
switched off (`lora_base`): with LoRA only the adapter trains, so the base weights under it are the
starting weights, and no second model is held in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from tirl.trainer.forward import response_logprobs
from tirl.types import Trajectory


class Reference:
    """Scores trajectories under the reference policy (no gradient)."""

    def __init__(self, model, lora_base: bool = False):
        if lora_base and not hasattr(model, "disable_adapter"):
            raise ValueError("a lora_base reference needs a LoRA-wrapped (peft) policy; this model has no adapter")
        self.model = model
        """The model scored: a frozen copy, or (lora_base) the policy itself."""
        self.lora_base = lora_base
        """Whether `model` is the policy, scored with its adapter disabled."""

    def logprobs(self, trajs: Sequence[Trajectory], *, temperature: float = 1.0,
                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`(B, R)` log pi_ref of each sampled token (0 elsewhere), R = the longest response."""
        ctx = self.model.disable_adapter() if self.lora_base else nullcontext()
        with torch.no_grad(), ctx:
            scored = response_logprobs(self.model, [t.prompt_ids for t in trajs], [t.response_ids for t in trajs],
                                       [t.loss_mask for t in trajs], temperature=temperature,
                                       compute_dtype=compute_dtype)
        return scored.logprobs


def as_reference(ref) -> Reference | None:
    """`ref` as a `Reference`: None stays None, a model becomes a `copy` reference."""
    if ref is None or isinstance(ref, Reference):
        return ref
    return Reference(ref)
