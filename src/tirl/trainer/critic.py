"""The PPO critic: a scalar value head on the policy's final hidden states (shared trunk).

`V_t` is read from the hidden state that predicts token t, the same position whose logits give
log pi(token t) (`forward.response_logprobs(value_head=...)`), so values line up with log-probs and
the loss mask. Old values (no gradient, after the rollout) feed GAE (`AdvantageInput.values`, reference
1.3); the head is trained with the clipped value loss of reference 2.4,
`0.5 * token-mean(max((V - Ret)^2, (clip(V, V_old - eps, V_old + eps) - Ret)^2))`, added to the policy
loss with a coefficient. Its gradient reaches the trunk too, except during critic warm-up, when only
the head learns (the policy is not updated).

The head is a parameter group of the stage's optimizer with its own learning rate (same schedule),
is saved in every checkpoint, and is written next to the final model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tirl.algorithms import masked_mean, masked_var, value_loss
from tirl.models.loading import base_model
from tirl.trainer.optim import make_scheduler


class ValueHead(nn.Module):
    """`V = w . h + b` for a final hidden state `h` (H,); zero-initialised, so every value starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_N_H: Tensor) -> Tensor:
        """`(N, H) -> (N,)` values in float32."""
        return self.linear(hidden_N_H.float()).squeeze(-1)


def make_value_head(model) -> ValueHead:
    """A value head sized for `model`'s hidden states, on its device, in float32."""
    device = next(model.parameters()).device
    return ValueHead(base_model(model).config.hidden_size).to(device)


def critic_loss(values_B_T: Tensor, old_values_B_T: Tensor, returns_B_T: Tensor, mask_B_T: Tensor,
                clip: float | None, num_tokens) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss, token-mean over the mask with the mini-batch's token count `num_tokens`
    (so micro-batch losses add up to the full-batch loss, as the policy loss)."""
    return value_loss(values_B_T, old_values_B_T, returns_B_T, mask_B_T, clip=clip, agg_mode="token-mean",
                      num_tokens=num_tokens)


def explained_variance(values_B_T: Tensor, returns_B_T: Tensor, mask_B_T: Tensor) -> float:
    """`1 - Var(Ret - V) / Var(Ret)` over mask==1 tokens (1: perfect, 0: no better than a constant;
    NaN when the returns do not vary)."""
    if float(mask_B_T.sum()) < 2:
        return float("nan")
    var_returns = masked_var(returns_B_T, mask_B_T)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns_B_T - values_B_T, mask_B_T) / var_returns)


def value_stats(old_values_B_T: Tensor, returns_B_T: Tensor, mask_B_T: Tensor) -> dict[str, float]:
    """`critic/values_mean`, `critic/returns_mean` and `critic/explained_variance` of a batch (old values)."""
    return {"critic/values_mean": float(masked_mean(old_values_B_T, mask_B_T)),
            "critic/returns_mean": float(masked_mean(returns_B_T, mask_B_T)),
            "critic/explained_variance": explained_variance(old_values_B_T, returns_B_T, mask_B_T)}


def attach_to_stage(head: ValueHead, stage, lr: float, optim_cfg, total_steps: int) -> None:
    """Train `head` in `stage`: a parameter group of its optimizer at learning rate `lr` (the schedule
    rebuilt over both groups) and a part of its checkpoints. Call before `stage.resume()`."""
    stage.optimizer.add_param_group({"params": list(head.parameters()), "lr": lr})
    stage.scheduler = make_scheduler(stage.optimizer, optim_cfg, total_steps)
    stage.ckpt.attach("value_head", head)


def save_value_head(head: ValueHead, path: Path) -> None:
    """Write the head's weights (`linear.weight` (1, H), `linear.bias` (1,)) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    tmp.rename(path)


def load_value_head(path: Path, device: str | torch.device = "cpu") -> ValueHead:
    """A head with the weights of `save_value_head`'s file."""
    state = load_file(str(path))
    head = ValueHead(state["linear.weight"].shape[1])
    head.load_state_dict(state)
    return head.to(device)
