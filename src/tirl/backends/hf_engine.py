"""Batched generation with a transformers causal LM: KV cache, shared-prefix prefill, stop strings.

`generate_batch` takes requests of different lengths and returns, for each, the sampled tokens and
their log-probabilities. What makes it fast on a CPU:

- The prefix shared by all requests (system prompt, tools) is computed once; requests with the same
  remaining prompt (the G samples of a group) share one prefill, then the cache is gathered per row.
- The KV cache grows into preallocated buffers instead of concatenating a new tensor every step.
- Rows that finish are dropped from the batch (compaction), so late rows do not pay for early ones.
- Sampling draws one uniform number per row from the row's own generator (inverse CDF), so a row's
  sample depends on its seed and logits only, not on the other rows.
- A turn's KV cache outlives the turn (`KVStore`): when a row ends, its cache (prompt and sampled
  tokens, all but the last, which was never run through the model) is kept under the trajectory's
  key (the request key without its turn index). When the trajectory's next turn arrives and its
  prompt starts with exactly those tokens, only the rest (the last sampled token and the
  observation) is prefilled on top of the kept cache (`resume`), not the whole conversation again.
  Kept caches are dropped when used, when the weights change (`HFBackend.update_weights`), and
  least recently used first beyond `kv_entries`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tirl.backends.base import Completion, GenerationRequest
from tirl.models.loading import with_cache


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into buffers of doubling capacity (no per-step torch.cat)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self._len, key_states.shape[-2]
        if self._kbuf is None or n + add > self._kbuf.shape[-2]:
            self._grow(key_states, value_states, n + add)
        self._kbuf[:, :, n:n + add] = key_states
        self._vbuf[:, :, n:n + add] = value_states
        self._len = n + add
        self._refresh()
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        cap = max(64, 2 * needed)
        kb = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        vb = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        if self._len:
            kb[:, :, :self._len] = self._kbuf[:, :, :self._len]
            vb[:, :, :self._len] = self._vbuf[:, :, :self._len]
        self._kbuf, self._vbuf = kb, vb

    def _refresh(self) -> None:
        self.keys = self._kbuf[:, :, :self._len]
        self.values = self._vbuf[:, :, :self._len]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._len:
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._len:
            self._kbuf = self._kbuf.repeat_interleave(repeats, 0)
            self._vbuf = self._vbuf.repeat_interleave(repeats, 0)
            self._refresh()

    def append_rows(self, other: _GrowingLayer) -> None:
        """Add `other`'s rows after this layer's, both right-aligned (left padding where shorter)."""
        n = max(self._len, other._len)
        k, v = self.keys, self.values
        rows = k.shape[0] + other.keys.shape[0]
        kb = k.new_zeros(rows, k.shape[1], max(64, 2 * n), k.shape[3])
        vb = torch.zeros_like(kb)
        kb[:k.shape[0], :, n - self._len:n], vb[:k.shape[0], :, n - self._len:n] = k, v
        kb[k.shape[0]:, :, n - other._len:n], vb[k.shape[0]:, :, n - other._len:n] = other.keys, other.values
        self._kbuf, self._vbuf, self._len = kb, vb, n
        self._refresh()

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` positions (padding that no remaining row attends to)."""
        if columns:
            self._kbuf = self._kbuf[:, :, columns:]
            self._vbuf = self._vbuf[:, :, columns:]
            self._len -= columns
            self._refresh()


def new_cache(model) -> DynamicCache:
    """A DynamicCache whose full-attention layers grow in place (sliding-window layers untouched)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class KVStore:
    """Caches of ended turns, by trajectory (request key without the turn index); LRU, bounded."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = \
            OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: tuple, tokens: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `kv` (per layer, keys and values (H, len(tokens), D)) for the trajectory `key`."""
        with self._lock:
            self._entries[key] = (tokens, kv)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def take(self, request: GenerationRequest):
        """The kept (tokens, kv) of `request`'s trajectory if its prompt extends those tokens (removed
        either way), else None."""
        if not request.key or not self.max_entries:
            return None
        with self._lock:
            entry = self._entries.pop(request.key[:-1], None)
        if entry is None:
            return None
        tokens, prompt = entry[0], request.prompt_ids
        return entry if len(tokens) < len(prompt) and tuple(prompt[:len(tokens)]) == tokens else None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class EngineStats:
    """Cumulative counters of an engine (read them as differences around a phase)."""

    prefill_tokens: int = 0
    """Prompt tokens run through the model (after prefix sharing)."""
    prefill_s: float = 0.0
    decode_steps: int = 0
    """Forward passes of one token per row."""
    decode_s: float = 0.0
    batches: int = 0

    def as_metrics(self, since: EngineStats) -> dict[str, float]:
        """Per-phase metrics between `since` and now. Counts are `gen/*` (a seeded run reproduces them);
        clock readings are `time/*` and `speed/*` (they never do)."""
        steps = self.decode_steps - since.decode_steps
        decode_s, prefill_s = self.decode_s - since.decode_s, self.prefill_s - since.prefill_s
        prefill_tokens = self.prefill_tokens - since.prefill_tokens
        return {"gen/decode_steps": float(steps), "gen/prefill_tokens": float(prefill_tokens),
                "gen/batches": float(self.batches - since.batches),
                "time/prefill_s": prefill_s, "time/decode_s": decode_s,
                "speed/decode_ms_per_step": 1000 * decode_s / steps if steps else 0.0,
                "speed/prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else 0.0}


@dataclass
class _Row:
    """Decoding state of one request."""

    request: GenerationRequest
    generator: torch.Generator
    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish: str | None = None

    def completion(self) -> Completion:
        return Completion(tuple(self.tokens), tuple(self.logprobs), self.finish or "length", tuple(self.entropies))


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by all sequences."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class HFEngine:
    """Synchronous batched generation for one model (see module docstring)."""

    def __init__(self, model, tokenizer, stop_token_ids: Sequence[int], max_context: int,
                 compact_fraction: float = 0.25, kv_entries: int = 0):
        """`kv_entries`: ended turns whose cache is kept for the trajectory's next turn (0: none, every
        turn prefills its whole prompt)."""
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.max_context = max_context
        self.compact_fraction = compact_fraction
        self.device = next(model.parameters()).device
        self.tokens_generated = 0
        self.stats = EngineStats()
        full = all(isinstance(layer, _GrowingLayer) for layer in new_cache(model).layers)
        self.kept = KVStore(kv_entries if full else 0)
        """Caches kept across turns (none for models with sliding-window layers: their cache is a window)."""

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Generate every request to its end; order of the output matches the input."""
        rows = [self._new_row(r) for r in requests]
        live = [i for i, r in enumerate(rows) if r.budget > 0]
        for i, r in enumerate(rows):
            if r.budget <= 0:
                r.finish = "length"
        if live:
            self._run(rows, live)
        return [r.completion() for r in rows]

    def _new_row(self, request: GenerationRequest) -> _Row:
        gen = torch.Generator(device="cpu").manual_seed(request.seed)
        budget = min(request.max_new_tokens, self.max_context - len(request.prompt_ids))
        return _Row(request, gen, budget)

    def _run(self, rows: list[_Row], live: list[int]) -> None:
        kept = {i: self.kept.take(rows[i].request) for i in live}
        fresh, resumed = [i for i in live if kept[i] is None], [i for i in live if kept[i] is not None]
        live = fresh + resumed  # the batch's row order
        t0 = time.perf_counter()
        parts = []
        if fresh:
            cache = new_cache(self.model)
            parts.append((cache, *self._prefill([rows[i].request.prompt_ids for i in fresh], cache)))
        if resumed:
            cache, attn, next_pos, logits = self.resume([(rows[i], kept[i]) for i in resumed])
            parts.append((cache, logits, attn, next_pos))
        cache, logits, attn, next_pos = parts[0]
        if len(parts) == 2:
            other, logits2, attn2, pos2 = parts[1]
            for la, lb in zip(cache.layers, other.layers):
                la.append_rows(lb)
            n = max(attn.shape[1], attn2.shape[1])
            attn = torch.cat([_pad_left(attn, n), _pad_left(attn2, n)])
            logits, next_pos = torch.cat([logits, logits2]), torch.cat([next_pos, pos2])
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.batches += 1
        t0 = time.perf_counter()
        try:
            self._decode(rows, live, cache, logits, attn, next_pos)
        finally:
            self.stats.decode_s += time.perf_counter() - t0

    def _decode(self, rows, live, cache, logits, attn, next_pos) -> None:
        active = list(live)  # row indices, aligned with the batch dimension
        finished_since_compact = 0
        while True:
            tokens = self._sample([rows[i] for i in active], logits)
            for k, (i, tok) in enumerate(zip(active, tokens)):
                if rows[i].finish is None and self._append(rows[i], tok):
                    self.keep(rows[i], attn[k], cache, k)
                    finished_since_compact += 1
            keep = [k for k, i in enumerate(active) if rows[i].finish is None]
            if not keep:
                return
            if finished_since_compact and finished_since_compact >= self.compact_fraction * len(active):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                attn, next_pos = attn[idx], next_pos[idx]
                tokens = [tokens[k] for k in keep]
                active = [active[k] for k in keep]
                finished_since_compact = 0
            self.stats.decode_steps += 1
            step_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            out = self.model(input_ids=step_ids, attention_mask=attn, position_ids=next_pos.unsqueeze(1),
                             use_cache=True, **with_cache(self.model, cache))
            next_pos = next_pos + 1
            logits = out.logits[:, -1].float()

    def resume(self, resumed: list[tuple[_Row, tuple]]):
        """Prefill rows whose trajectory's previous turn left its cache (`KVStore.take`): only what
        follows the kept tokens. Returns (cache, attention mask, next positions, last logits). Kept
        caches are right-aligned at width `wc`, the new tokens right-aligned after it (padding between a
        short row's cache and its new tokens is masked; positions are each row's own)."""
        lens = [len(tokens) for _, (tokens, _) in resumed]
        news = [row.request.prompt_ids[n:] for (row, _), n in zip(resumed, lens)]
        wc, ws, b = max(lens), max(len(x) for x in news), len(resumed)
        cache = new_cache(self.model)
        for li, layer in enumerate(cache.layers):
            k0 = resumed[0][1][1][li][0]
            keys = k0.new_zeros(b, k0.shape[0], wc, k0.shape[2])
            values = torch.zeros_like(keys)
            for r, (_, (_, kv)) in enumerate(resumed):
                keys[r, :, wc - lens[r]:], values[r, :, wc - lens[r]:] = kv[li]
            layer.update(keys, values)
        ids = torch.zeros((b, ws), dtype=torch.long)
        pos = torch.zeros((b, ws), dtype=torch.long)
        attn = torch.zeros((b, wc + ws), dtype=torch.long)
        for r, (n, new) in enumerate(zip(lens, news)):
            ids[r, ws - len(new):] = torch.tensor(new)
            pos[r, ws - len(new):] = torch.arange(n, n + len(new))
            attn[r, wc - n:wc] = 1
            attn[r, wc + ws - len(new):] = 1
        self.stats.prefill_tokens += sum(len(x) for x in news)
        dev = self.device
        out = self.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=True,
                         logits_to_keep=1, **with_cache(self.model, cache))
        next_pos = torch.tensor([len(row.request.prompt_ids) for row, _ in resumed], device=dev)
        return cache, attn.to(dev), next_pos, out.logits[:, -1].float()

    def keep(self, row: _Row, attn_row: torch.Tensor, cache: DynamicCache, k: int) -> None:
        """Keep the cache of batch row `k` (`row`, whose turn just ended; `attn_row` marks its cache
        positions) for its trajectory's next turn."""
        if not self.kept.max_entries or not row.request.key or row.finish == "length":
            return  # a turn cut by its budget ends its trajectory: no next turn to keep it for
        tokens = tuple(row.request.prompt_ids) + tuple(row.tokens[:-1])
        cols = attn_row.nonzero().squeeze(1)
        if len(cols) != len(tokens):
            return  # the cache does not hold exactly this row's tokens: keep nothing rather than guess
        self.kept.put(row.request.key[:-1], tokens,
                      [(layer.keys[k][:, cols], layer.values[k][:, cols]) for layer in cache.layers])

    def _prefill(self, prompts: list[tuple[int, ...]], cache: DynamicCache):
        """Fill the cache for all prompts; returns last-position logits, 2D attention mask, next positions."""
        c = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        if c > 0:
            self.model(input_ids=torch.tensor([prompts[0][:c]], device=self.device), use_cache=True,
                       logits_to_keep=1, **with_cache(self.model, cache))
            self.stats.prefill_tokens += c
        suffixes = [tuple(p[c:]) for p in prompts]
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(s, len(unique)) for s in suffixes]
        uniq = list(unique)
        if c > 0:
            cache.batch_repeat_interleave(len(uniq))
        width = max(len(s) for s in uniq)
        self.stats.prefill_tokens += sum(len(s) for s in uniq)
        ids = torch.full((len(uniq), width), 0, dtype=torch.long)
        suffix_mask = torch.zeros((len(uniq), width), dtype=torch.long)
        pos = torch.zeros((len(uniq), width), dtype=torch.long)
        for u, s in enumerate(uniq):
            ids[u, width - len(s):] = torch.tensor(s)
            suffix_mask[u, width - len(s):] = 1
            pos[u, width - len(s):] = torch.arange(c, c + len(s))
        attn = torch.cat([torch.ones((len(uniq), c), dtype=torch.long), suffix_mask], dim=1).to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=attn, position_ids=pos.to(self.device),
                         use_cache=True, logits_to_keep=1, **with_cache(self.model, cache))
        index = torch.tensor(row_to_unique, device=self.device)
        if len(uniq) != len(prompts) or row_to_unique != list(range(len(uniq))):
            cache.batch_select_indices(index)
        next_pos = torch.tensor([len(p) for p in prompts], device=self.device)
        return out.logits[:, -1].float()[index], attn[index], next_pos

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """One token per row; records its log-probability under softmax(logits / temperature).

        Vectorised over rows; each row draws its uniform number from its own generator (inverse-CDF
        sampling), so a row's token does not depend on the other rows.
        """
        logits = logits.to("cpu", torch.float32)  # sampled on the CPU wherever the model runs: same draws, one device
        temps = torch.tensor([max(r.request.sampling.temperature, 0.0) for r in rows], dtype=logits.dtype)
        greedy = temps <= 0
        logp = torch.log_softmax(logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1), dim=-1)
        tokens = torch.argmax(logp, dim=-1)
        sample_rows = [k for k, r in enumerate(rows) if r.finish is None and not greedy[k]]
        if sample_rows:
            idx = torch.tensor(sample_rows)
            probs = logp[idx].exp()
            top_ps = [rows[k].request.sampling.top_p for k in sample_rows]
            if min(top_ps) < 1.0:
                probs = torch.stack([_nucleus(p, tp) for p, tp in zip(probs, top_ps)])
            cdf = torch.cumsum(probs, dim=-1)
            u = torch.cat([torch.rand(1, generator=rows[k].generator) for k in sample_rows]) * cdf[:, -1]
            drawn = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1).clamp_max(cdf.shape[1] - 1)
            tokens[idx] = drawn
        chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        out = tokens.tolist()
        for row, tok, lp in zip(rows, out, chosen.tolist()):
            if row.finish is None:
                row.logprobs.append(lp)
        if any(r.request.want_entropies for r in rows):
            entropy = torch.special.entr(logp.exp()).sum(dim=-1).tolist()
            for row, h in zip(rows, entropy):
                if row.finish is None and row.request.want_entropies:
                    row.entropies.append(h)
        return out

    def _append(self, row: _Row, tok: int) -> bool:
        """Add a sampled token; returns True when the row just finished."""
        row.tokens.append(tok)
        self.tokens_generated += 1
        row.finish = finish_reason(row.tokens, row.budget, self.stop_token_ids, row.request.stop_strings,
                                   self.tokenizer)
        return row.finish is not None


def finish_reason(tokens: list[int], budget: int, stop_token_ids, stop_strings, tokenizer) -> str | None:
    """Why generation must stop after the last token of `tokens` (None: go on). Shared by backends."""
    if tokens[-1] in stop_token_ids:
        return "eos"
    if stop_strings:
        longest = max(len(s) for s in stop_strings)
        tail = tokenizer.decode(tokens[-longest:], skip_special_tokens=False)
        if any(s in tail for s in stop_strings):
            return "stop"
    if len(tokens) >= budget:
        return "length"
    return None


def _pad_left(attn: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([attn.new_zeros(attn.shape[0], n - attn.shape[1]), attn], dim=1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out tokens outside the smallest set whose mass reaches top_p (top_p >= 1: unchanged)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, dim=0) - sorted_p < top_p
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order[keep]] = True
    return torch.where(mask, probs, torch.zeros_like(probs))
