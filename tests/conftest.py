"""Shared fixtures: the default model's tokenizer and chat format, a tiny random model with the same
vocabulary (fast, for plumbing tests), and the real default model (for tests that need real outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted once into the tirl cache)."""
    from tirl.models.embedded import DEFAULT_MODEL, ensure_converted

    return ensure_converted(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from tirl.models.loading import load_tokenizer

    return load_tokenizer(str(smol_dir))


@pytest.fixture(scope="session")
def smol_format(smol_tokenizer):
    from tirl.chat.format import load_chat_format

    return load_chat_format(smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer: loads and trains in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_model(smol_dir):
    """The real default model in float32 (eager attention), shared by the tests that read it only."""
    import torch

    from tirl.models.loading import load_causal_lm

    model = load_causal_lm(str(smol_dir), torch.float32, "eager", "cpu")
    model.eval()
    return model
