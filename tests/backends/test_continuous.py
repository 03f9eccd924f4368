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
