"""`tirl_gqa`: eager attention for grouped-query attention that never copies K/V per query head.

transformers' eager attention repeats every key/value head for each query head that shares it
(`repeat_kv`), copying the whole KV cache at every layer of every decode step; on a CPU that copy
costs more than the attention itself. Here the query heads that share a KV head are folded into the
query-position axis instead, so one matmul serves the whole group, and the scores are computed as
(K Q^T)^T, an order in which a strided K (a view of tirl's growing cache) is read in place. Results are identical to eager
attention (same ops on the same numbers); it is registered with transformers' documented
`AttentionInterface`, and tirl uses it on CPU by default.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "tirl_gqa"


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query (B, H, T, D), key/value (B, KVH, L, D), additive mask (B, 1, T, L) -> (B, T, H, D), None."""
    batch, heads, steps, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group * steps, dim)
    # (K Q^T)^T, not Q K^T: with K a strided view of a growing cache, this order avoids a copy of K
    weights = torch.matmul(key, q.transpose(2, 3)).transpose(2, 3) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]].unsqueeze(2)
        weights = (weights.view(batch, kv_heads, group, steps, -1) + mask).view(batch, kv_heads, group * steps, -1)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).view(batch, heads, steps, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, eager_mask)
