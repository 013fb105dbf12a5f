"""ift.lora: LoRA adapters that train a small fraction, switch off to the base model, and merge exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ift.lora import adapters_disabled, add_lora, is_lora, merged_state_dict, parameter_counts, save_adapter
from ift.models import load_model
from ift.tokenization import load_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 42, 9, 88, 31, 7, 64]])


def lora_model(name: str = "tiny", **kwargs):
    tokenizer = load_tokenizer(name)
    base = load_model(name, seed=0, tokenizer=tokenizer)
    model = add_lora(base, **({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS} | kwargs))
    # B starts at zero (the adapted model starts as the base); give it values so merges are not vacuous.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                p.normal_(std=0.05, generator=generator)
    return model.eval()


def test_on_tiny_100m_lora_trains_under_five_percent_of_the_parameters():
    model = lora_model("tiny-100m", r=16, alpha=32)
    trainable, total = parameter_counts(model)
    assert total > 90e6 and 0 < trainable / total < 0.05, (trainable, total)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_fresh_adapter_leaves_the_model_as_it_was():
    tokenizer = load_tokenizer("tiny")
    base = load_model("tiny", seed=0, tokenizer=tokenizer)
    before = base(IDS).logits
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def test_with_adapters_disabled_the_model_computes_its_base():
    model = lora_model()
    with adapters_disabled(model):
        off = model(IDS).logits
    base = load_model("tiny", seed=0, tokenizer=load_tokenizer("tiny"))(IDS).logits
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)
    assert not torch.allclose(model(IDS).logits, base, atol=1e-3)  # the adapters do change it


def test_the_merged_export_is_a_plain_model_with_the_adapted_models_logits(tmp_path):
    model = lora_model()
    merged = merged_state_dict(model, model.state_dict())
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    model.get_base_model().save_pretrained(tmp_path / "merged", state_dict=merged)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_lora(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_the_adapters_are_saved_as_peft_loads_them(tmp_path):
    from peft import PeftModel

    model = lora_model()
    save_adapter(model, model.state_dict(), str(tmp_path / "adapter"))
    base = load_model("tiny", seed=0, tokenizer=load_tokenizer("tiny"))
    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


def test_a_target_module_the_model_lacks_is_an_error_naming_its_linear_layers():
    base = load_model("tiny", seed=0, tokenizer=load_tokenizer("tiny"))
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer of LlamaForCausalLM; its linear layers"):
        add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["qproj", "v_proj"])
