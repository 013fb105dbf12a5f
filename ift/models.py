"""Model loading, including the bundled offline ``tiny`` presets (tokenizers: :mod:`ift.tokenization`).

``load_model`` accepts either

- a preset name from :data:`MODEL_PRESETS` (``"tiny"``, ``"tiny-100m"``, ``"bench-1b"``): a
  Llama architecture built *from a config* (random init, seeded) with the
  bundled byte-level BPE tokenizer (:func:`ift.tokenization.load_tokenizer`).  Nothing is
  downloaded, so tests and demos run offline;
- anything else: passed to ``AutoModelForCausalLM``
  ``from_pretrained`` (a Hub id or a local directory holding a saved model).

``trust_remote_code`` is off unless the caller asks for it: it executes Python
shipped with the checkpoint.

This module must stay free of ray / deepspeed / mlflow imports (deepspeed is imported lazily only to
gather parameters DeepSpeed itself partitioned).
"""

from __future__ import annotations

import logging
from importlib.metadata import version as _pkg_version
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ift.tokenization import check_local_path, is_preset, load_tokenizer

logger = logging.getLogger(__name__)

# Llama configs built from scratch for the presets.  ``vocab_size`` and the
# special-token ids are filled in from the tokenizer at build time.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 192,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}

# ~104M parameters with the tiny tokenizer: big enough to make GPU benchmarks
# meaningful (compute-bound matmuls), small enough for one GPU without sharding.
TINY_100M_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}

# ~0.85B parameters: a Llama at the width and depth of the 1B class (hidden 2048, 16 layers, grouped-query
# attention 16/4 heads, SwiGLU 5632) with a 32,000-entry vocabulary, so the LM head and the logits weigh
# what they do in real models.  For GPU benchmarks (`make gpu-check`, random init, random token ids): the
# bundled tokenizer covers only its first 2,048 ids, so it is no model to generate text with.
BENCH_1B_CONFIG: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
}

# Preset name -> Llama config kwargs.  All presets use the bundled tokenizer; ``vocab_size``, where a
# preset sets it, is a floor (the tokenizer's size otherwise).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY_CONFIG,
    "tiny-100m": TINY_100M_CONFIG,
    "bench-1b": BENCH_1B_CONFIG,
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name (``"float32"``, ``"bf16"``, ...) to ``torch.dtype``.

    ``"auto"`` is passed through: ``from_pretrained`` then uses the
    checkpoint's own dtype.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


# --------------------------------------------------------------------------- model


def build_preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """Llama config of preset ``name`` sized and wired to ``tokenizer`` (the vocabulary: the tokenizer's
    size, or the preset's ``vocab_size`` where that is larger)."""
    try:
        kwargs = dict(MODEL_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}") from None
    return LlamaConfig(
        vocab_size=max(len(tokenizer), kwargs.pop("vocab_size", 0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _set_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, overwrite_eos: bool) -> None:
    """Wire pad/eos ids into the model and generation configs."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    if overwrite_eos:
        model.config.eos_token_id = eos
        if gen is not None:
            gen.eos_token_id = eos
        return
    # Pretrained checkpoints may list several stop ids (e.g. Llama 3); keep
    # them and only make sure the tokenizer's end-of-turn token is among them.
    if gen is not None:
        current = gen.eos_token_id
        ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
        if eos not in ids:
            gen.eos_token_id = ids + [eos] if ids else eos


def _from_pretrained_dtype_kwargs(dtype: torch.dtype | str) -> dict[str, Any]:
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; the old name
    # warns in 5.x, the new one is unknown before 4.56.
    major, minor = (int(x) for x in _pkg_version("transformers").split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def resolve_attention(requested: str | None) -> tuple[str | None, str]:
    """``model.attn_implementation`` as this machine runs it, and why: ``auto`` is flash-attention 2
    on a CUDA machine with the flash-attn package, else sdpa; anything else stays as asked."""
    if requested != "auto":
        return requested, f"model.attn_implementation={requested}"
    import importlib.util

    if not torch.cuda.is_available():
        return "sdpa", "model.attn_implementation=auto: sdpa, no CUDA GPU here"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", (
            "model.attn_implementation=auto: sdpa, the flash-attn package is not installed "
            "(pip install flash-attn --no-build-isolation for flash_attention_2)"
        )
    return "flash_attention_2", "model.attn_implementation=auto: flash_attention_2, CUDA and flash-attn installed"


def check_attention(attn_implementation: str | None) -> None:
    """Refuse flash-attention 2 where it cannot run, naming the config key."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn "
            "--no-build-isolation, on a CUDA machine); use sdpa otherwise"
        )
    if not torch.cuda.is_available():
        raise ValueError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")


def init_preset_weights(model: PreTrainedModel, seed: int) -> None:
    """Initialise a preset as transformers does for Llama (linear and embedding weights
    N(0, ``initializer_range``), biases 0, norms 1), each module from its own generator seeded
    by ``seed`` and the module's name.

    The weights then depend on nothing but the seed and the names: not on the order modules are
    built in, nor on whether DeepSpeed built them into ZeRO-3 partitions (then each module is
    gathered, initialised on rank 0 and re-partitioned), so a ZeRO-3 run starts from exactly
    the weights of a ZeRO-0 run.
    """
    import zlib

    std = model.config.initializer_range
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        with whole_parameters(params, keep_changes=True), torch.no_grad():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=generator))
                if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif "RMSNorm" in type(module).__name__:
                module.weight.fill_(1.0)


def whole_parameters(params: list[torch.nn.Parameter], *, keep_changes: bool = False):
    """A context in which ``params`` are whole: DeepSpeed's gather for ZeRO-3 partitions (with
    ``keep_changes``, rank 0's writes are kept and re-partitioned), nothing for ordinary parameters.
    deepspeed is imported only when it partitioned them, so this module needs no DeepSpeed otherwise."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if keep_changes else None)


def embedding_rows(model: torch.nn.Module) -> int:
    """Rows of the input embedding table.  Under ZeRO-3 the local parameter is an empty partition;
    DeepSpeed keeps the real shape in ``ds_shape`` (reading 0 would resize on every GPU, whole)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build or load a causal LM.

    ``attn_implementation`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ``"auto"``
    (:func:`resolve_attention`); None = transformers' default) picks the attention kernel;
    flash-attention without its package or without CUDA is a ``ValueError`` that says so, before any
    weight is loaded.

    - A preset name builds a randomly initialised ``LlamaForCausalLM`` from
      :data:`MODEL_PRESETS` (:func:`init_preset_weights`: the same ``seed`` gives the same
      weights, whole or built into ZeRO-3 partitions; the global RNG is left untouched).
    - Anything else is ``AutoModelForCausalLM.from_pretrained`` (Hub id or
      local directory), safetensors only (pickle checkpoints can run code).

    ``tokenizer`` (loaded for presets if omitted) supplies the vocabulary size
    and the pad/eos ids.
    """
    torch_dtype = resolve_dtype(dtype)
    attn_implementation, _ = resolve_attention(attn_implementation)
    check_attention(attn_implementation)
    if is_preset(name_or_path):
        if tokenizer is None:
            tokenizer = load_tokenizer(name_or_path)
        config = build_preset_config(name_or_path, tokenizer)
        # _from_config builds straight into DeepSpeed partitions when a ZeRO-3 HfDeepSpeedConfig is
        # alive (transformers.integrations), so no rank ever holds the whole model.
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        with torch.random.fork_rng(devices=[]):  # torch's own default init draws from the global RNG
            model = LlamaForCausalLM._from_config(config, dtype=None if torch_dtype == "auto" else torch_dtype)
        init_preset_weights(model, seed)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        _set_special_ids(model, tokenizer, overwrite_eos=True)
        return model

    check_local_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        **_from_pretrained_dtype_kwargs(torch_dtype),
    )
    if tokenizer is not None:
        if len(tokenizer) > embedding_rows(model):
            # The tokenizer gained tokens the checkpoint has no rows for.
            logger.info("resizing embeddings of %s to %d tokens", name_or_path, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
        _set_special_ids(model, tokenizer, overwrite_eos=False)
    return model
