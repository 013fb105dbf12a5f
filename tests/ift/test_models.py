"""Tests for ift.models: bundled tokenizer, offline presets, loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ift.models import MODEL_PRESETS, build_preset_config, load_model
from ift.tokenization import (
    FALLBACK_CHAT_TEMPLATE,
    TINY_SPECIAL_TOKENS,
    TINY_TOKENIZER_DIR,
    load_tokenizer,
    train_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer("tiny")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save_plain_tokenizer(path: Path, *, with_pad: bool) -> None:
    """A word-level tokenizer with no chat template (like a base model's)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "[PAD]", "hi", "there", "<|user|>", "<|assistant|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if with_pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]", **kwargs).save_pretrained(path)


# --------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_has_the_documented_special_tokens(tiny_tok) -> None:
    for token in TINY_SPECIAL_TOKENS:
        assert token in tiny_tok.all_special_tokens
    assert tiny_tok.eos_token == "<|end|>"
    assert tiny_tok.pad_token == "<pad>"
    assert tiny_tok.bos_token == "<s>"
    assert len({tiny_tok.eos_token_id, tiny_tok.pad_token_id, tiny_tok.bos_token_id}) == 3


def test_tiny_tokenizer_vocab_is_about_2048(tiny_tok) -> None:
    assert 1900 <= len(tiny_tok) <= 2100


def test_tiny_tokenizer_round_trips_text(tiny_tok) -> None:
    text = "Tom has 3 + 4 = 7 apples. The answer is 7. Ünïcode works too: 😀"
    assert tiny_tok.decode(tiny_tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_chat_template_renders_system_user_assistant(tiny_tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tiny_tok.apply_chat_template(msgs, tokenize=False) == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"
    )


def test_tiny_chat_template_adds_generation_prompt(tiny_tok) -> None:
    text = tiny_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_tiny_chat_template_rejects_unknown_roles(tiny_tok) -> None:
    with pytest.raises(Exception, match="Unknown role: tool"):
        tiny_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_bundled_tokenizer_regenerates_byte_identically(tmp_path: Path) -> None:
    train_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_bundled_tokenizer_files_are_small() -> None:
    assert sum(p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()) < 300_000


def test_tokenizer_without_chat_template_gets_the_fallback(tmp_path: Path) -> None:
    _save_plain_tokenizer(tmp_path, with_pad=True)
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE


def test_fallback_template_ends_turns_with_eos(tmp_path: Path) -> None:
    _save_plain_tokenizer(tmp_path, with_pad=True)
    tok = load_tokenizer(str(tmp_path))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}], tokenize=False
    )
    assert text == "<|user|>\nhi[EOS]\n<|assistant|>\nthere[EOS]\n"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    _save_plain_tokenizer(tmp_path, with_pad=False)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "[EOS]"
    assert tok.pad_token_id == tok.eos_token_id


def test_tokenizer_loads_from_a_saved_directory(tmp_path: Path, tiny_tok) -> None:
    tiny_tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again.chat_template == tiny_tok.chat_template
    assert again("hello world")["input_ids"] == tiny_tok("hello world")["input_ids"]


# --------------------------------------------------------------------------- model


def test_tiny_model_is_a_small_untied_llama(tiny_tok) -> None:
    model = load_model("tiny", seed=0, tokenizer=tiny_tok)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 192 and cfg.max_position_embeddings == 512
    assert cfg.vocab_size == len(tiny_tok)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_tiny_model_special_ids_come_from_the_tokenizer(tiny_tok) -> None:
    model = load_model("tiny", seed=0, tokenizer=tiny_tok)
    assert model.config.pad_token_id == tiny_tok.pad_token_id
    assert model.config.eos_token_id == tiny_tok.eos_token_id
    assert model.generation_config.eos_token_id == tiny_tok.eos_token_id


def test_same_seed_gives_identical_weights(tiny_tok) -> None:
    assert _same_weights(load_model("tiny", seed=7, tokenizer=tiny_tok), load_model("tiny", seed=7))


def test_different_seeds_give_different_weights(tiny_tok) -> None:
    assert not _same_weights(
        load_model("tiny", seed=7, tokenizer=tiny_tok), load_model("tiny", seed=8, tokenizer=tiny_tok)
    )


def test_seeded_build_leaves_the_global_rng_alone(tiny_tok) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny", seed=0, tokenizer=tiny_tok)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_forward_returns_loss_and_logits(tiny_tok) -> None:
    model = load_model("tiny", seed=0, tokenizer=tiny_tok)
    ids = torch.tensor([tiny_tok("The answer is 7.")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tiny_tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_load_model_casts_to_the_requested_dtype(tiny_tok) -> None:
    model = load_model("tiny", seed=0, tokenizer=tiny_tok, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_unknown_dtype_is_rejected(tiny_tok) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny", dtype="float8", tokenizer=tiny_tok)


def test_saved_model_directory_loads_with_the_same_weights(tmp_path: Path, tiny_tok) -> None:
    model = load_model("tiny", seed=3, tokenizer=tiny_tok)
    model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), tokenizer=tiny_tok)
    assert _same_weights(model, again)
    assert again.config.pad_token_id == tiny_tok.pad_token_id


def test_tiny_100m_preset_has_about_100m_parameters(tiny_tok) -> None:
    # Built on the meta device: counts parameters without allocating 400 MB.
    with torch.device("meta"):
        model = LlamaForCausalLM(build_preset_config("tiny-100m", tiny_tok))
    n = sum(p.numel() for p in model.parameters())
    assert 90e6 < n < 115e6


def test_presets_share_the_bundled_tokenizer(tiny_tok) -> None:
    assert set(MODEL_PRESETS) >= {"tiny", "tiny-100m"}
    assert load_tokenizer("tiny-100m").get_vocab() == tiny_tok.get_vocab()


def test_the_attention_kernel_is_the_one_asked_for():
    assert load_model("tiny", seed=0, attn_implementation="eager").config._attn_implementation == "eager"
    assert load_model("tiny", seed=0, attn_implementation="sdpa").config._attn_implementation == "sdpa"


def test_flash_attention_where_it_cannot_run_is_an_error_naming_the_key(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ValueError, match="model.attn_implementation=flash_attention_2 needs the flash-attn package"):
        load_model("tiny", attn_implementation="flash_attention_2")


def _machine(monkeypatch, *, cuda: bool, flash_attn: bool) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if flash_attn else None) if name == "flash_attn" else real(name, *a),
    )


@pytest.mark.parametrize(
    "cuda,flash_attn,expected,reason",
    [
        (True, True, "flash_attention_2", "CUDA and flash-attn installed"),
        (True, False, "sdpa", "pip install flash-attn"),
        (False, True, "sdpa", "no CUDA GPU"),
    ],
)
def test_auto_attention_is_flash_attention_2_only_on_cuda_with_the_package_and_says_why(
    monkeypatch, cuda, flash_attn, expected, reason
):
    from ift.models import resolve_attention

    _machine(monkeypatch, cuda=cuda, flash_attn=flash_attn)
    impl, why = resolve_attention("auto")
    assert impl == expected and reason in why and why.startswith("model.attn_implementation=auto")


def test_an_explicit_attention_kernel_is_kept_as_asked():
    from ift.models import resolve_attention

    assert resolve_attention("eager") == ("eager", "model.attn_implementation=eager")


def test_auto_attention_loads_sdpa_on_this_cpu_machine():
    assert load_model("tiny", seed=0, attn_implementation="auto").config._attn_implementation == "sdpa"


def test_embedding_rows_read_a_zero3_partitions_real_shape():
    from ift.models import embedding_rows
    from tests.conftest import build_llama

    model = build_llama(vocab=32)
    assert embedding_rows(model) == 32
    partition = torch.nn.Parameter(torch.empty(0))  # what a rank holds of a ZeRO-3 parameter
    partition.ds_shape = torch.Size([32, 16])
    model.get_input_embeddings().weight = partition
    assert embedding_rows(model) == 32


def test_every_model_preset_loads_the_bundled_tokenizer():
    from ift.models import MODEL_PRESETS
    from ift.tokenization import PRESET_NAMES

    assert set(MODEL_PRESETS) == set(PRESET_NAMES)
