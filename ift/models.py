"""Tokenizer and model loading, including the bundled offline ``tiny`` presets.

``load_tokenizer`` / ``load_model`` accept either

- a preset name from :data:`MODEL_PRESETS` (``"tiny"``, ``"tiny-100m"``, ``"bench-1b"``): a
  Llama architecture built *from a config* (random init, seeded) with the
  bundled byte-level BPE tokenizer in ``ift/assets/tiny_tokenizer``.  Nothing is
  downloaded, so tests and demos run offline;
- anything else: passed to ``AutoTokenizer`` / ``AutoModelForCausalLM``
  ``from_pretrained`` (a Hub id or a local directory holding a saved model).

``trust_remote_code`` is off unless the caller asks for it: it executes Python
shipped with the checkpoint.

This module must stay free of ray / deepspeed / mlflow imports (deepspeed is imported lazily only to
gather parameters DeepSpeed itself partitioned).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"
TINY_TOKENIZER_CORPUS = ASSETS_DIR / "tiny_tokenizer_corpus.txt"

# Special tokens of the bundled tokenizer.  Their order fixes their ids (0..7),
# so only ever append.
BOS_TOKEN = "<s>"
DOC_EOS_TOKEN = "</s>"  # end of a plain document; kept for non-chat text
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_OF_TURN_TOKEN = "<|end|>"
TINY_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    DOC_EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_OF_TURN_TOKEN,
)
TINY_VOCAB_SIZE = 2048

_ROLE_CHECK = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown role: ' ~ message['role'] ~ ' (expected system, user or assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Chat template of the bundled tokenizer:
#   <s><|system|>\n{sys}<|end|>\n<|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n
# ``<|end|>`` is the tokenizer's eos, so generation stops at the end of an
# assistant turn, and it is part of each assistant target span.
TINY_CHAT_TEMPLATE = (
    _ROLE_CHECK + "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# Installed on tokenizers that ship without a chat template (base models such
# as GPT-2).  Same layout as the tiny template, but the turn terminator is the
# tokenizer's own eos token: the marker strings are plain text for such a
# tokenizer, and ending turns with eos is what makes ``generate`` stop.
FALLBACK_CHAT_TEMPLATE = (
    _ROLE_CHECK + "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ (eos_token or '') ~ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

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


def is_preset(name_or_path: str) -> bool:
    """True when ``name_or_path`` names a built-in preset rather than a checkpoint."""
    return name_or_path in MODEL_PRESETS


def check_local_path(name_or_path: str, what: str = "model") -> None:
    """A name written as a local path (``./m``, ``../m``, ``/m``, ``~/m``, ``a/b/c``) that does not exist
    is a ``ValueError`` saying so; otherwise transformers would answer with the hub's repo-id rules."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"{what} {name_or_path!r}: no such local directory (a hub id is 'org/name'; a local path must exist)"
        )


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


# --------------------------------------------------------------------------- tokenizer


def _tiny_tokenizer_training_text() -> list[str]:
    """Bundled text the tiny BPE is trained on (deterministic, in a fixed order)."""
    # Imported here so that importing ift.models stays cheap.
    from ift import toydata

    texts = [p.strip() for p in TINY_TOKENIZER_CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    # Seeds differ from the bundled data files' seeds on purpose: the tokenizer
    # should generalise to the task family, not memorise the training split.
    for row in toydata.make_conversations(3000, seed=1000):
        texts.extend(m["content"] for m in row["messages"])
    for row in toydata.make_preference_pairs(1000, seed=1001):
        texts.append(row["rejected"][-1]["content"])
    for row in toydata.make_prompt_completion(1000, seed=1002):
        texts.extend((row["prompt"], row["completion"]))
    return texts


def train_tiny_tokenizer(out_dir: str | Path = TINY_TOKENIZER_DIR, *, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """(Re)train the bundled byte-level BPE tokenizer and save it to ``out_dir``.

    Deterministic: the same code writes byte-identical files.  The config files
    are written by hand (rather than by ``save_pretrained``) so their content
    does not depend on the installed ``transformers`` version and they load
    with both 4.x and 5.x (``tokenizer_class`` is the portable
    ``PreTrainedTokenizerFast``; the chat template is inlined).

    Returns the output directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable, so <unk> is never produced; it is
    # kept as a special token only because downstream code expects one.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_tokenizer_training_text(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"), pretty=True)

    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": END_OF_TURN_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [DOC_EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
    }
    config = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": TINY_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_100M_CONFIG["max_position_embeddings"],
        "padding_side": "right",
    }
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def ensure_pad_and_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token and a chat template if it lacks them (in place)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; "
                "set one explicitly before training"
            )
        # Reusing eos avoids growing the vocabulary (which would require
        # resizing the embeddings).  It is safe here because padded positions
        # are masked out by attention_mask and by labels=-100, never by id.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer %s has no pad token; using eos %r", tokenizer.name_or_path, tokenizer.eos_token)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        logger.warning(
            "tokenizer %s has no chat template; installed ift.models.FALLBACK_CHAT_TEMPLATE "
            "(<|role|>\\n{content}%s\\n)",
            tokenizer.name_or_path,
            tokenizer.eos_token,
        )
    return tokenizer


def load_tokenizer(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer that is ready for chat training.

    A preset name (``"tiny"``, ``"tiny-100m"``) loads the bundled tokenizer from
    the package directory; anything else goes to ``AutoTokenizer.from_pretrained``.
    ``chat_template`` (a template shipped with ift such as ``"chatml"``, a path to a
    Jinja file, or template text: :func:`ift.chat_templates.resolve_chat_template`)
    replaces the tokenizer's own template; saving the tokenizer saves it.
    The result always has a pad token and a chat template (see
    :func:`ensure_pad_and_template`).
    """
    template = None
    if chat_template is not None:
        from ift.chat_templates import resolve_chat_template

        template = resolve_chat_template(chat_template)  # before loading: a typo fails fast
    if is_preset(name_or_path):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    else:
        check_local_path(name_or_path, "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if template is not None:
        tokenizer.chat_template = template
    return ensure_pad_and_template(tokenizer)


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
