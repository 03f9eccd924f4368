"""Shared-prefix scoring equals scoring every row from scratch (values and gradients)."""

from __future__ import annotations

import torch

from tirl.trainer.forward import response_logprobs


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _reference(model, prompts, responses, masks):
    total = 0.0
    values = torch.zeros(len(prompts), max(len(r) for r in responses))
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        logp = torch.log_softmax(model(torch.tensor([list(p) + list(r)])).logits[0].float(), -1)
        for k, (tok, on) in enumerate(zip(r, m)):
            if on:
                values[i, k] = logp[len(p) + k - 1, tok].detach()
                total = total - logp[len(p) + k - 1, tok]
    return values, total


def test_shared_prefix_scoring_is_exact(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731
    shared = rand(30)
    prompts = [shared + rand(4), shared + rand(7), shared + rand(4)]
    prompts[2] = prompts[0]  # two samples of one prompt
    responses = [rand(9), rand(5), rand(12)]
    masks = [[1, 1, 0, 0, 1, 1, 1, 0, 1], [1] * 5, [0] * 3 + [1] * 9]
    out = response_logprobs(model, prompts, responses, masks, with_entropy=True)
    (-(out.logprobs * out.mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_values, ref_total = _reference(model, prompts, responses, masks)
    ref_total.backward()
    torch.testing.assert_close(out.logprobs.detach(), ref_values, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)
    assert out.mask.sum() == sum(map(sum, masks))
    assert (out.entropy[out.mask == 0] == 0).all() and (out.entropy[out.mask == 1] > 0).all()


def test_rows_without_common_prefix(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    prompts, responses, masks = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], [[1, 1], [1, 0, 1]]
    out = response_logprobs(model, prompts, responses, masks)
    ref, _ = _reference(model, prompts, responses, masks)
    torch.testing.assert_close(out.logprobs.detach(), ref, atol=1e-5, rtol=0)


def test_temperature_scales_the_policy(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    prompts, responses, masks = [[5, 6, 7]], [[10, 11, 12]], [[1, 1, 1]]
    with torch.no_grad():
        hot = response_logprobs(model, prompts, responses, masks, temperature=2.0).logprobs
        logits = model(torch.tensor([[5, 6, 7, 10, 11, 12]])).logits[0, 2:5].float() / 2.0
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[10], [11], [12]])).squeeze(-1)
    torch.testing.assert_close(hot[0], ref, atol=1e-5, rtol=0)
