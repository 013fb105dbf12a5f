"""TRL as the peer of our SFT and DPO training step: useful tokens per second on the same model and data.

TRL (Hugging Face's ``SFTTrainer`` / ``DPOTrainer``) is the reference open-source implementation of both
objectives on the same ``transformers`` models, so its throughput is the figure ours should be read against.
This module runs TRL's real trainers, not a re-implementation, on one of our presets (``ift.models``) and on
already tokenized examples, and times the optimizer steps with a ``TrainerCallback``.

Written against **TRL 1.16** (``trl.__version__`` is recorded with every figure) and transformers 5.x:

* SFT takes a pre-tokenized dataset through its ``input_ids`` column; ``completion_mask`` (0 on the prompt,
  1 on the completion) is folded into ``labels`` only with ``completion_only_loss=True``, which is set here
  (for an ``input_ids`` dataset TRL's default would be the loss on every token).  ``padding_free=True``
  flattens the micro-batch into one row with ``position_ids`` restarting at 0 per sequence, no
  ``attention_mask`` and no padding (``pad_to_multiple_of`` is ``None`` off Neuron).  TRL documents it as
  FlashAttention-only but does not check the attention implementation: with ``sdpa`` / ``eager``,
  transformers 5 builds a block-diagonal causal mask from the restarting ``position_ids`` when
  ``attention_mask`` is ``None``, so the flattened forward is correct and really padding-free (the mask is
  dense, ``(total tokens)^2``).  TRL refuses ``padding_free`` with a ``max_length`` but no packing, so
  ``max_length`` is checked here and TRL gets ``max_length=None``.
* DPO in 1.16 **ignores ``padding_free``**: ``DPOTrainer`` logs a warning ("temporarily unavailable after a
  refactor") and falls back to padded batches (prompt+chosen rows then prompt+rejected rows, right-padded to
  the longest).  The result's ``padding_free`` is what TRL really did, ``padding_free_requested`` what was
  asked.  ``DPOTrainer`` also always tokenizes text columns; ``_PretokenizedDPOTrainer`` skips that and hands
  the ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns straight to TRL's own
  ``DataCollatorForPreference``.  The reference model is an explicit frozen copy of the start weights (TRL's
  default would reload it from the model's hub id, which a preset built from a config does not have), run
  under ``no_grad`` every step (``precompute_ref_log_probs=False``), ``beta=0.1``, ``loss_type="sigmoid"``.
* Both trainers compute the log-probs with TRL's fused, tiled LM head over labelled positions only (the full
  ``(tokens, vocab)`` logits are never built); that is part of what is measured.

Settings: CPU (``use_cpu=True``), float32 (``bf16=False``, TRL would default it on), no gradient
checkpointing (TRL defaults it on; our loop does not checkpoint unless asked), TRL's default optimizer
(transformers' ``adamw_torch_fused``), ``max_grad_norm=1.0``, one micro-batch per optimizer step, seed 0,
incomplete last batches dropped, no eval, no saving, no logging, no reporting, output in a temporary
directory removed afterwards.

What is counted: **useful tokens = every real (non-padding) token a training forward processes**, taken from
the collated batch TRL feeds each timed step: SFT, the prompt+completion tokens of each example; DPO, the
prompt+chosen and the prompt+rejected sequence of each pair (the prompt counts twice, as it is processed
twice; the reference forward over the same tokens is not counted again).  Padded batches count
``attention_mask.sum()``, padding-free ones every position of the flattened row.  This is the definition of
our own ``tokens_per_s`` (``benchmarks.step_time``).  Time: from ``on_step_begin`` to ``on_step_end`` of each
of the ``steps`` optimizer steps after ``warmup`` (forward(s), backward, clipping, optimizer and scheduler
step); fetching and collating the batch happens before ``on_step_begin`` and is not timed.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from pipelines.config import METHOD_CONFIGS

METHODS = ("sft", "dpo")


def _sft_rows(examples: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    rows = []
    for ex in examples:
        prompt, completion = list(ex["prompt_ids"]), list(ex["completion_ids"])
        if len(prompt) + len(completion) > max_length:
            raise ValueError(f"example of {len(prompt) + len(completion)} tokens exceeds max_length={max_length}")
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def _dpo_rows(examples: list[dict], max_length: int) -> list[dict[str, list[int]]]:
    rows = []
    for ex in examples:
        row = {"prompt_ids": list(ex["prompt_ids"]), "chosen_ids": list(ex["chosen_ids"])}
        row["rejected_ids"] = list(ex["rejected_ids"])
        longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if longest > max_length:
            raise ValueError(f"pair of {longest} tokens exceeds max_length={max_length}")
        rows.append(row)
    return rows


def _pretokenized_dpo_trainer() -> type:
    from trl import DPOTrainer

    class _PretokenizedDPOTrainer(DPOTrainer):
        """``DPOTrainer`` fed token ids: the dataset already holds the collator's ``*_ids`` columns."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return _PretokenizedDPOTrainer


def _checkpointing_field(config_cls: type) -> str:
    # transformers 5.x renamed ``gradient_checkpointing`` (TRL defaults it to True) to ``activation_checkpointing``.
    names = {f.name for f in dataclasses.fields(config_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a batch collated by TRL (padded: ``attention_mask``; padding-free: every position)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def build_trainer(
    method: str,
    model_name: str,
    examples: list[dict],
    *,
    batch_size: int,
    max_length: int,
    max_steps: int,
    output_dir: str,
    padding_free: bool = True,
    lr: float = 1e-5,
) -> Any:
    """TRL's trainer for ``method`` on preset ``model_name`` and the tokenized ``examples`` (see the module doc)."""
    from datasets import Dataset
    from trl import DPOConfig, SFTConfig, SFTTrainer

    from ift.models import load_model
    from ift.tokenization import load_tokenizer

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
    tokenizer = load_tokenizer(model_name)  # always has a pad token (ift.tokenization.ensure_pad_and_template)
    model = load_model(model_name, dtype="float32", seed=0, tokenizer=tokenizer)
    common: dict[str, Any] = {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        _checkpointing_field(SFTConfig): False,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": max_steps,
        "learning_rate": lr,
        "max_grad_norm": 1.0,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "dataloader_drop_last": True,
        "dataloader_pin_memory": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "logging_steps": 10**9,
        "report_to": [],
        "disable_tqdm": True,
        "padding_free": padding_free,
    }
    if not METHOD_CONFIGS[method].paired:  # TRL's SFTTrainer; pairs go to its DPOTrainer
        args = SFTConfig(**common, max_length=None, completion_only_loss=True)
        dataset = Dataset.from_list(_sft_rows(examples, max_length))
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    args = DPOConfig(**common, max_length=max_length, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False)
    dataset = Dataset.from_list(_dpo_rows(examples, max_length))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    return _pretokenized_dpo_trainer()(
        model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )


class _StepClock(TrainerCallback):
    """Wall time of every optimizer step from index ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter() if state.global_step >= self.warmup else None

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None


def _count_step_tokens(trainer: Any) -> tuple[list[int], list[int]]:
    """Record (real tokens, padded positions) of the batch of every training step, in step order."""
    tokens: list[int] = []
    positions: list[int] = []
    inner = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        tokens.append(real_tokens(inputs))
        positions.append(int(inputs["input_ids"].numel()))
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step  # Trainer calls self.training_step once per micro-batch
    return tokens, positions


def trl_tokens_per_s(
    method: str,
    model_name: str,
    examples: list[dict],
    *,
    batch_size: int,
    max_length: int,
    steps: int,
    warmup: int,
    threads: int = 1,
    padding_free: bool = True,
    lr: float = 1e-5,
) -> dict:
    """Useful tokens per second of TRL's ``method`` trainer over ``steps`` timed optimizer steps after ``warmup``.

    ``examples``: sft ``{"prompt_ids", "completion_ids"}``, dpo ``{"prompt_ids", "chosen_ids", "rejected_ids"}``
    (token ids, prompt plus completion at most ``max_length``).  See the module doc for what is counted.
    """
    import trl

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    output_dir = tempfile.mkdtemp(prefix=f"trl_peer_{method}_")
    try:
        trainer = build_trainer(
            method,
            model_name,
            examples,
            batch_size=batch_size,
            max_length=max_length,
            max_steps=warmup + steps,
            output_dir=output_dir,
            padding_free=padding_free,
            lr=lr,
        )
        clock = _StepClock(warmup)
        trainer.add_callback(clock)
        trainer.remove_callback(PrinterCallback)  # it would print the end-of-training metrics
        tokens, positions = _count_step_tokens(trainer)
        trainer.train()
        effective_padding_free = bool(trainer.padding_free)
        attn = str(trainer.model.config._attn_implementation)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        torch.set_num_threads(previous_threads)
    if len(clock.durations) != steps or len(tokens) != warmup + steps:
        raise RuntimeError(f"timed {len(clock.durations)} of {steps} steps, counted {len(tokens)} batches")
    timed_tokens = sum(tokens[warmup:])
    timed_positions = sum(positions[warmup:])
    seconds = sum(clock.durations)
    return {
        "tokens_per_s": timed_tokens / seconds,
        "steps": steps,
        "seconds": seconds,
        "tokens": timed_tokens,
        "trl_version": trl.__version__,
        "padding_free": effective_padding_free,
        "padding_free_requested": padding_free,
        "padding_fraction": 1.0 - timed_tokens / timed_positions,
        "examples_per_step": batch_size,
        "attn_implementation": attn,
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "threads": threads,
    }
