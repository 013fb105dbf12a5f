"""Tokenization on Ray Data: JSON payloads -> token ids (an actor pool; the tokenizer loads once per
actor), and how many tokenizer actors a cluster can afford beside the training workers."""

from __future__ import annotations

import math

import numpy as np
import ray

from ift.chat_templates import chat_template_hash, resolve_chat_template
from ift.data import DataError, parse_json_row, tokenize_example
from ift.tokenization import load_tokenizer
from pipelines.config import TrainConfig
from pipelines.data.batching import data_mode, token_keys

# Bump when tokenization changes what a row becomes: it is part of every cache key.
# 2: ShareGPT, Alpaca, plain-text and tool-call rows; JSON error columns.
TOKENIZATION_VERSION = 2
META_KEYS = ("source", "row", "line", "error", "error_kind", "num_tokens")


# --------------------------------------------------------------------------- tokenization


class TokenizeRows:
    """``map_batches`` callable: JSON payloads -> token ids, or the row's error.

    The tokenizer is loaded once per actor, in ``__init__``, with ``chat_template`` (a shipped
    name, a Jinja file or the template text: ``data.chat_template``) when given.  A bad row keeps
    its place in the stream with ``error``/``error_kind`` set and empty token columns.
    """

    def __init__(
        self,
        tokenizer_name: str,
        mode: str,
        max_length: int,
        truncation: str,
        trust_remote_code: bool,
        chat_template: str | None = None,
    ):
        self.tokenizer = load_tokenizer(
            tokenizer_name, trust_remote_code=trust_remote_code, chat_template=chat_template
        )
        self.mode = mode
        self.max_length = max_length
        self.truncation = truncation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = token_keys(self.mode)
        out: dict[str, list] = {k: [] for k in (*keys, *META_KEYS)}
        lines = batch["line"] if "line" in batch else [0] * len(batch["row"])
        for source, row, line, payload in zip(batch["source"], batch["row"], lines, batch["payload"], strict=True):
            source, row, line = str(source), int(row), int(line)
            error = kind = ""
            try:
                obj = parse_json_row(payload, source, row, line=line or None)
                tokens = tokenize_example(
                    self.tokenizer, obj, mode=self.mode, max_length=self.max_length,
                    truncation=self.truncation, source=source, index=row,
                )  # fmt: skip
            except DataError as exc:
                error, kind = exc.reason, exc.kind
                tokens = {k: [] for k in keys}
            for k in keys:
                out[k].append(np.asarray(tokens[k], dtype=np.int32))
            out["source"].append(source)
            out["row"].append(row)
            out["line"].append(line)
            out["error"].append(error)
            out["error_kind"].append(kind)
            out["num_tokens"].append(len(tokens[keys[0]]))
        return out


def tokenizer_id(cfg: TrainConfig) -> str:
    """The tokenizer's name and revision, and a hash of ``data.chat_template``'s text when set, as the
    cache key sees it."""
    name = f"{cfg.model.tokenizer or cfg.model.name}@{cfg.model.revision or 'default'}"
    if cfg.data.chat_template is None:
        return name
    return f"{name}+chat_template:{chat_template_hash(cfg.data.chat_template)}"


def tokenize_rows_args(cfg: TrainConfig) -> tuple:
    """:class:`TokenizeRows`' constructor arguments for a config: ``TokenizeRows(*tokenize_rows_args(cfg))``
    tokenizes as training does (in the actor pool, the driver's packing estimate and the dry run)."""
    return (
        cfg.model.tokenizer or cfg.model.name,
        data_mode(cfg),
        cfg.data.max_length,
        cfg.data.truncation,
        cfg.model.trust_remote_code,
        # The text, read here: the actors may run on nodes without the template's file.
        None if cfg.data.chat_template is None else resolve_chat_template(cfg.data.chat_template),
    )


def tokenize(ds: ray.data.Dataset, cfg: TrainConfig, *, concurrency: int, num_cpus: float) -> ray.data.Dataset:
    return ds.map_batches(
        TokenizeRows,
        fn_constructor_args=tokenize_rows_args(cfg),
        batch_size=cfg.data.tokenize_batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        batch_format="numpy",
    )


def tokenizer_resources(
    cfg: TrainConfig, cluster_cpus: float, *, training_cpus: float | None = None
) -> tuple[int, float]:
    """``(actors, CPUs per actor)`` for the tokenizer pool.

    ``data.tokenize_concurrency`` wins when set.  Otherwise one actor per CPU the
    training workers (``training_cpus``, default: the config's workers) leave free,
    at most 16 and at least one.  When the workers take every CPU (a laptop) the
    actors ask for a share of what is left so they can run at all; they then
    compete with training for CPU, which the driver says.
    """
    if training_cpus is None:
        training_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    free = cluster_cpus - training_cpus
    if cfg.data.tokenize_concurrency is not None:
        actors = cfg.data.tokenize_concurrency
    else:
        actors = int(max(1, min(16, free)))
    per_actor = 1.0 if free >= actors else max(free, 0.0) / actors
    return actors, math.floor(per_actor * 1000) / 1000
