"""Tokenizer loading, and the bundled offline tokenizer of the ``tiny`` presets.

``load_tokenizer`` takes a preset name (:data:`PRESET_NAMES`: the bundled byte-level BPE in
``ift/assets/tiny_tokenizer``, nothing downloaded) or anything ``AutoTokenizer.from_pretrained``
takes, and returns a tokenizer ready for chat training (a pad token and a chat template).

Apart from :mod:`ift.models` on purpose: Ray Data's tokenizing processes import this module, and
it loads no model classes (importing them costs each such process about two seconds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# The model presets (:data:`ift.models.MODEL_PRESETS`), which all use the bundled tokenizer.
PRESET_NAMES: tuple[str, ...] = ("tiny", "tiny-100m", "bench-1b")

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
TINY_TOKENIZER_MAX_LENGTH = 2048  # the longest context of a preset (tiny-100m)

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


def is_preset(name_or_path: str) -> bool:
    """True when ``name_or_path`` names a built-in preset rather than a checkpoint."""
    return name_or_path in PRESET_NAMES


def check_local_path(name_or_path: str, what: str = "model") -> None:
    """A name written as a local path (``./m``, ``../m``, ``/m``, ``~/m``, ``a/b/c``) that does not exist
    is a ``ValueError`` saying so; otherwise transformers would answer with the hub's repo-id rules."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"{what} {name_or_path!r}: no such local directory (a hub id is 'org/name'; a local path must exist)"
        )


def _tiny_tokenizer_training_text() -> list[str]:
    """Bundled text the tiny BPE is trained on (deterministic, in a fixed order)."""
    # Imported here: only retraining the tokenizer needs the toy data generators.
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
        "model_max_length": TINY_TOKENIZER_MAX_LENGTH,
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
            "tokenizer %s has no chat template; installed ift.tokenization.FALLBACK_CHAT_TEMPLATE "
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
