"""Asynchronous (continuous) batching: rows joining a running batch decode exactly as they would alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tirl.backends.base import GenerationRequest, SamplingParams
from tirl.backends.continuous import ContinuousBatcher
from tirl.backends.hf_engine import HFEngine


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), smol_tokenizer


TEXTS = ["<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nWhat is 2+2? Think.<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>system\nBe brief and exact.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n"
         "<|im_start|>assistant\n"]


def _run_staggered(batcher, requests, delays):
    """Submit request k after delays[k] seconds; returns completions and the order they came back in."""
    order = []

    async def one(k):
        await asyncio.sleep(delays[k])
        out = await batcher.submit(requests[k])
        order.append(k)
        return out

    async def main():
        return await asyncio.gather(*(one(k) for k in range(len(requests))))

    return asyncio.run(main()), order


def test_rows_joining_mid_batch_match_a_full_forward_pass(tiny):
    """Greedy tokens equal transformers' generate and log-probs equal a full forward pass, for rows
    that arrive while others are decoding (their cache is left-padded and merged into the batch)."""
    model, tok = tiny
    batcher = ContinuousBatcher(HFEngine(model, tok, [tok.eos_token_id], 1024), max_batch_size=8)
    prompts = [tuple(tok.encode(t, add_special_tokens=False)) for t in TEXTS]
    reqs = [GenerationRequest(p, 20 - 3 * k, sampling=SamplingParams(0.0), want_entropies=True)
            for k, p in enumerate(prompts)]
    try:
        outs, _ = _run_staggered(batcher, reqs, [0.0, 0.01, 0.03, 0.05])
    finally:
        batcher.close()
    for p, req, out in zip(prompts, reqs, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=req.max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert list(out.token_ids) == ref
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([list(p) + ref])).logits[0].float(), -1)
        rows = logp[len(p) - 1:len(p) - 1 + len(ref)]
        assert out.logprobs == pytest.approx([float(rows[k, t]) for k, t in enumerate(ref)], abs=1e-4)
        assert out.entropies == pytest.approx((-(rows.exp() * rows).sum(-1)).tolist(), abs=1e-3)
    assert batcher.engine.stats.batches >= 2  # later rows were admitted into a running batch


def test_a_short_turn_is_answered_before_the_long_one_ends(tiny):
    model, tok = tiny
    batcher = ContinuousBatcher(HFEngine(model, tok, [], 1024), max_batch_size=8)
    p = tuple(tok.encode(TEXTS[0], add_special_tokens=False))
    reqs = [GenerationRequest(p, 60, seed=0), GenerationRequest(p, 3, seed=1)]
    try:
        outs, order = _run_staggered(batcher, reqs, [0.0, 0.0])
    finally:
        batcher.close()
    assert [len(o.token_ids) for o in outs] == [60, 3]
    assert order == [1, 0]


def test_samples_do_not_depend_on_arrival_times(tiny):
    model, tok = tiny
    prompts = [tuple(tok.encode(t, add_special_tokens=False)) for t in TEXTS]
    reqs = [GenerationRequest(p, 12, sampling=SamplingParams(1.0), seed=7 + k) for k, p in enumerate(prompts)]
    results = []
    for delays in ([0.0] * 4, [0.0, 0.02, 0.01, 0.04]):
        batcher = ContinuousBatcher(HFEngine(model, tok, [tok.eos_token_id], 1024), max_batch_size=8)
        try:
            outs, _ = _run_staggered(batcher, reqs, delays)
        finally:
            batcher.close()
        results.append([o.token_ids for o in outs])
    assert results[0] == results[1]


def test_engine_errors_reach_every_waiter_and_the_batcher_recovers(tiny):
    model, tok = tiny
    batcher = ContinuousBatcher(HFEngine(model, tok, [tok.eos_token_id], 1024), max_batch_size=8)
    good = GenerationRequest(tuple(tok.encode(TEXTS[2], add_special_tokens=False)), 4)
    bad = GenerationRequest((len(tok) + 10,), 4)  # a token id outside the vocabulary

    async def main():
        return await asyncio.gather(batcher.submit(bad), return_exceptions=True)

    try:
        [err] = asyncio.run(main())
        assert isinstance(err, (IndexError, RuntimeError))
        [out], _ = _run_staggered(batcher, [good], [0.0])
        assert len(out.token_ids) >= 1
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher.submit(good))


def _conversations(batcher, tok, turns=3, n=3, keyless=()):
    """`n` greedy conversations of `turns` turns; each next prompt is the previous prompt, the turn's
    tokens and an observation, submitted under the conversation's key with the turn index (no key for
    the conversations in `keyless`: their turns never continue a kept cache)."""
    obs = tuple(tok.encode("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False))

    async def conversation(i):
        prompt, outs = tuple(tok.encode(TEXTS[i], add_special_tokens=False)), []
        async with batcher.participant():
            for t in range(turns):
                await asyncio.sleep(0.01 * i)
                key = () if i in keyless else (i, t)
                out = await batcher.submit(GenerationRequest(prompt, 12, sampling=SamplingParams(0.0), key=key))
                outs.append((prompt, out))
                prompt = prompt + out.token_ids + obs
        return outs

    async def main():
        return await asyncio.gather(*(conversation(i) for i in range(n)))

    return asyncio.run(main())


def _stop_ids(model, tok) -> list[int]:
    """Tokens the random tiny model writes a few tokens into its greedy answers: as stop tokens they end
    turns early with finish reason eos (as a real model's end-of-turn token would)."""
    batcher = ContinuousBatcher(HFEngine(model, tok, [], 1024), max_batch_size=8)
    try:
        first = [out for conv in _conversations(batcher, tok, turns=1) for _, out in conv]
    finally:
        batcher.close()
    return sorted({out.token_ids[3] for out in first})


@pytest.mark.parametrize("scheduling", ["async", "sync"])
def test_a_turn_continues_from_the_cache_its_previous_turn_left(tiny, scheduling):
    """Later turns prefill only the last token and the observation on the kept cache, and decode
    exactly what prefilling the whole conversation gives (greedy tokens, log-probs of a full forward),
    with either batcher."""
    from tirl.backends.batching import BarrierBatcher

    model, tok = tiny
    stop_ids = _stop_ids(model, tok)
    runs = {}
    for kv_entries in (8, 0):
        engine = HFEngine(model, tok, stop_ids, 1024, kv_entries=kv_entries)
        batcher = (ContinuousBatcher(engine, max_batch_size=8) if scheduling == "async"
                   else BarrierBatcher(engine.generate_batch, max_batch_size=8))
        try:
            # conversation 0 has no key: its later turns are prefilled whole, in the same batches as the
            # others' continued turns (fresh and continued rows merged into one batch)
            runs[kv_entries] = (_conversations(batcher, tok, keyless=(0,)), engine.stats.prefill_tokens)
        finally:
            batcher.close()
    (kept, kept_prefill), (plain, plain_prefill) = runs[8], runs[0]
    ended = [out.finish_reason for conv in kept for _, out in conv]
    assert ended.count("eos") >= 6, ended  # most turns end on a stop token, so the next one reuses the cache
    for conv_kept, conv_plain in zip(kept, plain):
        for (prompt, a), (_, b) in zip(conv_kept, conv_plain):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([list(prompt + a.token_ids)])).logits[0].float(), -1)
            rows = logp[len(prompt) - 1:len(prompt) - 1 + len(a.token_ids)]
            assert a.logprobs == pytest.approx([float(rows[k, t]) for k, t in enumerate(a.token_ids)], abs=1e-4)
    # turn 0 prefills its prompt; every later turn only the previous turn's last token and the observation
    obs = len(tok.encode("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False))
    continued = [[prev.finish_reason == "eos" and c > 0 for _, prev in conv[:-1]] for c, conv in enumerate(kept)]
    later = sum(sum(flags) for flags in continued)
    whole = sum(len(prompt) for conv, flags in zip(kept, continued)
                for (prompt, _), cont in zip(conv[1:], flags) if not cont)
    assert later >= 3 and kept_prefill <= sum(len(conv[0][0]) for conv in kept) + later * (1 + obs) + whole
    assert kept_prefill < plain_prefill, (kept_prefill, plain_prefill)


def test_kept_caches_are_used_only_for_the_exact_continuation_and_dropped_with_new_weights(tiny):
    from tirl.backends.hf_engine import KVStore

    store = KVStore(max_entries=2)
    kv = [(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))]
    store.put(("a",), (1, 2, 3), kv)
    assert store.take(GenerationRequest((1, 2, 4, 5), 4, key=("a", 1))) is None  # diverges: not used
    assert store.take(GenerationRequest((1, 2, 3, 5), 4, key=("a", 1))) is None  # taken once, then gone
    store.put(("a",), (1, 2, 3), kv)
    assert store.take(GenerationRequest((1, 2, 3), 4, key=("a", 1))) is None  # nothing new to prefill
    store.put(("a",), (1, 2, 3), kv)
    assert store.take(GenerationRequest((1, 2, 3, 5), 4, key=("b", 1))) is None  # another trajectory
    assert store.take(GenerationRequest((1, 2, 3, 5), 4, key=("a", 1)))[0] == (1, 2, 3)
    for name in "abc":  # least recently used first beyond max_entries
        store.put((name,), (1,), kv)
    assert len(store) == 2 and store.take(GenerationRequest((1, 2), 4, key=("a", 1))) is None

    from tirl.backends.hf import HFBackend

    model, tok = tiny
    backend = HFBackend(model, tok, _stop_ids(model, tok), 1024)
    try:
        _conversations(backend.batcher, tok, turns=1)
        assert len(backend.engine.kept) > 0
        backend.update_weights(model.state_dict())
        assert len(backend.engine.kept) == 0  # computed by the old weights
    finally:
        backend.close()
