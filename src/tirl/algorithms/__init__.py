"""RL math for tirl: advantage estimators, policy losses, aggregation, KL, critic loss.

Pure torch functions (no other tirl imports besides the registry). Estimators and policy losses are
looked up by name in `ADVANTAGES` and `POLICY_LOSSES`; add your own with `register_advantage` /
`register_policy_loss`.

- Advantage estimators: outcome level `grpo`, `drgrpo`, `rloo`, `reinforce_pp`,
  `reinforce_pp_baseline`, `hdpo` and critic-based `gae` (`advantages`); turn level `igpo`,
  `matchtir`, `mt_grpo` (`turns`, from `AdvantageInput.turn_ids`); tree level `portool` (`tree`).
- Policy losses: `ppo_clip` (`losses`); `gspo`, `cispo`, `aepo`, `clip_cov` (`policy_losses`).
- KL: `kl_penalty` for the loss, `kl_in_reward` for the reward; `agg_loss` and `loss_normalisers`
  aggregate per-token losses so micro-batches add up to the full batch.
"""

from tirl.algorithms.advantages import (
    AdvantageInput,
    drgrpo_advantages,
    gae_advantages,
    grpo_advantages,
    hdpo_advantages,
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
    kl_in_reward,
    kl_penalty,
    loss_normalisers,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_clip_loss,
    value_loss,
)
from tirl.algorithms.policy_losses import (
    aepo_loss,
    cispo_loss,
    clip_cov_loss,
    gspo_loss,
    token_zscore,
)
from tirl.algorithms.registry import ADVANTAGES, POLICY_LOSSES, register_advantage, register_policy_loss
from tirl.algorithms.tree import (
    NeedsTreeError,
    TreeStructure,
    mean_over_sharing_rows,
    owner_mask,
    portool_advantages,
)
from tirl.algorithms.turns import (
    TurnTable,
    igpo_advantages,
    information_gain_rewards,
    matchtir_advantages,
    mt_grpo_advantages,
    turn_table,
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
    "TurnTable",
    "aepo_loss",
    "agg_loss",
    "cispo_loss",
    "clip_cov_loss",
    "drgrpo_advantages",
    "entropy_from_logits",
    "gae_advantages",
    "grpo_advantages",
    "gspo_loss",
    "hdpo_advantages",
    "igpo_advantages",
    "information_gain_rewards",
    "kl_in_reward",
    "kl_penalty",
    "loss_normalisers",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "matchtir_advantages",
    "mean_over_sharing_rows",
    "mt_grpo_advantages",
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
    "token_zscore",
    "turn_table",
    "value_loss",
]
