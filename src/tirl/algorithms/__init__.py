"""RL math for tirl: advantage estimators, policy losses, aggregation, KL, critic loss.

Pure torch functions (no other tirl imports besides the registry). Estimators and policy losses are
looked up by name in `ADVANTAGES` and `POLICY_LOSSES`; add your own with `register_advantage` /
`register_policy_loss`.
"""

from tirl.algorithms.advantages import (
    AdvantageInput,
    drgrpo_advantages,
    gae_advantages,
    grpo_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    scores_from_token_rewards,
)
from tirl.algorithms.losses import (
    AGG_MODES,
    KL_KINDS,
    PolicyLossInput,
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    loss_normalisers,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_clip_loss,
    value_loss,
)
from tirl.algorithms.registry import ADVANTAGES, POLICY_LOSSES, register_advantage, register_policy_loss
from tirl.algorithms.tree import (
    NeedsTreeError,
    TreeStructure,
    mean_over_sharing_rows,
    owner_mask,
    portool_advantages,
)

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_KINDS",
    "NeedsTreeError",
    "POLICY_LOSSES",
    "AdvantageInput",
    "PolicyLossInput",
    "TreeStructure",
    "agg_loss",
    "drgrpo_advantages",
    "entropy_from_logits",
    "gae_advantages",
    "grpo_advantages",
    "kl_penalty",
    "loss_normalisers",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_over_sharing_rows",
    "owner_mask",
    "outcome_token_rewards",
    "portool_advantages",
    "ppo_clip_loss",
    "register_advantage",
    "register_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "scores_from_token_rewards",
    "value_loss",
]
