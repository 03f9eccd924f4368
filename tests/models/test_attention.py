"""`tirl_gqa` attention gives the same outputs and gradients as transformers' eager attention."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tirl.models.attention  # noqa: F401 - registers tirl_gqa
from tirl.models.loading import output_cache, with_cache


def _pair():
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    eager = LlamaForCausalLM(cfg)
    cfg2 = LlamaConfig(**{**cfg.to_dict(), "_attn_implementation": "tirl_gqa"})
    gqa = LlamaForCausalLM._from_config(cfg2, attn_implementation="tirl_gqa")
    gqa.load_state_dict(eager.state_dict())
    eager.config._attn_implementation = "eager"
    return eager, gqa


def test_prefill_with_padding_and_gradients_match():
    eager, gqa = _pair()
    x = torch.randint(0, 300, (3, 17))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    mask[2, 6:9] = 0  # padding in the middle, as tirl's shared-prefix layouts use
    a, b = eager(x, attention_mask=mask).logits, gqa(x, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, pa), pb in zip(eager.named_parameters(), gqa.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_decode_with_cache_matches():
    eager, gqa = _pair()
    x = torch.randint(0, 300, (2, 9))
    outs = []
    for model in (eager, gqa):
        with torch.no_grad():
            out = model(x, use_cache=True)
            step = model(torch.tensor([[5], [7]]), use_cache=True, **with_cache(model, output_cache(out)))
        outs.append(step.logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
