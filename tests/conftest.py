"""Shared fixtures: tiny models built from a config (no hub access anywhere)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_llama(vocab: int = 32, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Larger-than-default init so greedy predictions differ from targets and IFT's fusion matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def llama64() -> LlamaForCausalLM:
    return build_llama()
