"""Log-probabilities of response tokens under the policy, for training (with gradients).

Sequences in a micro-batch usually share a long prefix (the system prompt and tools; for the G
samples of a group, the whole prompt). The shared prefix is run once, its KV cache is repeated for
every row, and only the rest of each row is run on top: exact, and several times cheaper than running
every row from the start. The language-model head is applied only at the positions that are scored
(the loss mask), not at prompt, observation or padding positions. A critic's value head, when given,
reads the same hidden states: `V_t` comes from the hidden state that predicts token t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tirl.backends.hf_engine import common_prefix_len
from tirl.models.loading import base_model, output_cache, with_cache


@dataclass(frozen=True)
class ScoredBatch:
    """Per-token outputs for a micro-batch, aligned with the response positions (padded with 0)."""

    logprobs: torch.Tensor
    """(B, R) log pi(token) at scored positions (differentiable); 0 elsewhere."""
    entropy: torch.Tensor | None
    """(B, R) entropy of pi at scored positions (no gradient unless asked); None if not computed."""
    mask: torch.Tensor
    """(B, R) float: 1 at scored positions."""
    values: torch.Tensor | None = None
    """(B, R) float32 value-head outputs V_t at scored positions; 0 elsewhere; None without a value head."""


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      masks: Sequence[Sequence[int]], *, temperature: float = 1.0,
                      compute_dtype: torch.dtype = torch.float32, with_entropy: bool = False,
                      entropy_grad: bool = False, value_head=None, value_trunk_grad: bool = True) -> ScoredBatch:
    """Score response tokens where `masks` is 1; see module docstring. Shapes: B rows, R = max response.

    `value_head` (a module `(N, H) -> (N,)`) also gives `values`; `value_trunk_grad=False` detaches the
    hidden states it reads, so the values' gradient reaches the head only."""
    device = next(model.parameters()).device
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    rows, width = len(full), max(len(r) for r in responses)
    index, targets, where = _gather_plan(prompts, responses, masks)
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        table = _hidden_table(model, full, device)
        hidden = table[index.to(device)]
        logits = base_model(model).get_output_embeddings()(hidden).float()
    logits = _softcap(model, logits) / max(temperature, 1e-6)
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)
    logprobs = torch.zeros(rows, width, device=device, dtype=picked.dtype)
    logprobs = logprobs.index_put((where[0].to(device), where[1].to(device)), picked)
    mask = torch.zeros(rows, width, device=device)
    mask[where[0].to(device), where[1].to(device)] = 1.0
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.zeros(rows, width, device=device, dtype=ent.dtype).index_put(
                (where[0].to(device), where[1].to(device)), ent)
    values = None
    if value_head is not None:
        v = value_head(hidden if value_trunk_grad else hidden.detach())
        values = torch.zeros(rows, width, device=device, dtype=v.dtype).index_put(
            (where[0].to(device), where[1].to(device)), v)
    return ScoredBatch(logprobs, entropy, mask, values)


def _gather_plan(prompts, responses, masks):
    """Which hidden rows to read (index into the hidden table), which tokens to score, and where."""
    full_lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    c = _shared_len(full)
    suffix_width = max(full_lens) - c
    index, targets, rows, cols = [], [], [], []
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        for k, (tok, on) in enumerate(zip(r, m)):
            if not on:
                continue
            src = len(p) + k - 1  # position whose output predicts this token
            index.append(src if src < c else c + i * suffix_width + (src - c))
            targets.append(tok)
            rows.append(i)
            cols.append(k)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return as_long(index), as_long(targets), (as_long(rows), as_long(cols))


def _shared_len(full: list[list[int]]) -> int:
    """Prefix run once: the common prefix, leaving every row at least one token of its own."""
    return max(0, min(common_prefix_len(full), min(len(s) for s in full) - 1))


def _hidden_table(model, full: list[list[int]], device) -> torch.Tensor:
    """Final hidden states: rows [0, c) = shared prefix, then row i's suffix at c + i*S + j."""
    decoder = base_model(model).get_decoder()
    c = _shared_len(full)
    width = max(len(s) for s in full) - c
    ids = torch.zeros(len(full), width, dtype=torch.long)
    attn = torch.zeros(len(full), c + width, dtype=torch.long)
    attn[:, :c] = 1
    for i, s in enumerate(full):
        ids[i, :len(s) - c] = torch.tensor(s[c:])
        attn[i, c:len(s)] = 1
    pos = torch.arange(c, c + width).expand(len(full), width)
    pieces = []
    cache = None
    if c > 0:
        out = decoder(input_ids=torch.tensor([full[0][:c]], device=device), use_cache=True)
        cache = output_cache(out)
        cache.batch_repeat_interleave(len(full))
        pieces.append(out.last_hidden_state[0])
    out = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                  use_cache=cache is not None, **with_cache(decoder, cache))
    pieces.append(out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]))
    return torch.cat(pieces, dim=0)


def _softcap(model, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(base_model(model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
