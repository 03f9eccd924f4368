"""The hf generation engine against transformers' own generate and full forward passes."""

from __future__ import annotations

import pytest
import torch

from tirl.backends.base import GenerationRequest, SamplingParams
from tirl.backends.hf_engine import HFEngine, common_prefix_len


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), smol_tokenizer


def _prompts(tok):
    texts = ["<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nWhat is 2+2? Think.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    return [tuple(tok.encode(t, add_special_tokens=False)) for t in texts]


def test_common_prefix_len():
    assert common_prefix_len([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_len([(1,), (2,)]) == 0
    assert common_prefix_len([(5, 6)]) == 2


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, [tok.eos_token_id], 1024)
    prompts = _prompts(tok)
    outs = engine.generate_batch([GenerationRequest(p, 12, sampling=SamplingParams(0.0)) for p in prompts])
    for p, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        if ref and ref[-1] == tok.eos_token_id:
            assert out.finish_reason == "eos"
        assert list(out.token_ids) == ref[:len(out.token_ids)] and len(out.token_ids) == len(ref)


def test_logprobs_equal_a_full_forward_pass(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, [tok.eos_token_id], 1024)
    prompts = _prompts(tok)
    outs = engine.generate_batch([GenerationRequest(p, 10, sampling=SamplingParams(0.7), seed=i)
                                  for i, p in enumerate(prompts)])
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            logits = model(torch.tensor([list(p) + list(out.token_ids)])).logits[0].float()
        logp = torch.log_softmax(logits / 0.7, -1)
        ref = [float(logp[len(p) - 1 + k, t]) for k, t in enumerate(out.token_ids)]
        assert out.logprobs == pytest.approx(ref, abs=1e-4)


def test_samples_depend_on_seed_not_on_batch_composition(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, [tok.eos_token_id], 1024)
    prompts = _prompts(tok)
    reqs = [GenerationRequest(p, 15, sampling=SamplingParams(1.0), seed=100 + i) for i, p in enumerate(prompts)]
    together = engine.generate_batch(reqs)
    alone = [engine.generate_batch([r])[0] for r in reqs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    other_seed = engine.generate_batch([GenerationRequest(prompts[0], 15, sampling=SamplingParams(1.0), seed=7)])
    assert other_seed[0].token_ids != together[0].token_ids


def test_identical_prompts_share_prefill_and_differ_by_seed(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, [tok.eos_token_id], 1024)
    p = _prompts(tok)[1]
    outs = engine.generate_batch([GenerationRequest(p, 8, sampling=SamplingParams(1.0), seed=s) for s in range(4)])
    assert len({o.token_ids for o in outs}) > 1
    again = engine.generate_batch([GenerationRequest(p, 8, sampling=SamplingParams(1.0), seed=2)])
    assert again[0].token_ids == outs[2].token_ids


def test_budget_stop_strings_and_context(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, [tok.eos_token_id], 1024)
    p = _prompts(tok)[0]
    free = engine.generate_batch([GenerationRequest(p, 20, sampling=SamplingParams(0.0))])[0]
    assert len(free.token_ids) <= 20
    text = tok.decode(free.token_ids[:6])
    stop = text[-3:]  # a string the greedy continuation is known to produce
    stopped = engine.generate_batch([GenerationRequest(p, 20, (stop,), SamplingParams(0.0))])[0]
    assert stopped.finish_reason == "stop" and stop in tok.decode(stopped.token_ids)
    assert len(stopped.token_ids) <= 6
    full = HFEngine(model, tok, [tok.eos_token_id], max_context=len(p) + 3)
    capped = full.generate_batch([GenerationRequest(p, 20, sampling=SamplingParams(0.0))])[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) <= 3
    none_left = HFEngine(model, tok, [tok.eos_token_id], max_context=len(p))
    assert none_left.generate_batch([GenerationRequest(p, 5)])[0].token_ids == ()


def test_rows_finishing_early_do_not_change_the_others(tiny):
    """Compaction (dropping finished rows from the batch) must not alter the remaining rows."""
    model, tok = tiny
    prompts = _prompts(tok)
    eager = HFEngine(model, tok, [tok.eos_token_id], 1024, compact_fraction=0.0)
    never = HFEngine(model, tok, [tok.eos_token_id], 1024, compact_fraction=10.0)
    reqs = [GenerationRequest(p, n, sampling=SamplingParams(1.0), seed=i)
            for i, (p, n) in enumerate(zip(prompts, (3, 25, 9)))]
    a, b = eager.generate_batch(reqs), never.generate_batch(reqs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [len(o.token_ids) for o in a] == [3, 25, 9]
