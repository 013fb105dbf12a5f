"""The final Hugging Face export: module by module, in shards, never the whole model on one rank.

Under ZeRO-3 no rank holds the model; gathering all of it at once (DeepSpeed's
``GatheredParameters(model.parameters())``) would put 14 GB of a 7B bf16 model on
every GPU, and a ``state_dict`` copy of it in rank 0's host memory.  Here every
rank walks the modules in the same order and gathers one module's own parameters
at a time; rank 0 copies them to host memory and writes a safetensors shard each
time ``max_shard_bytes`` have built up, so its host memory holds at most one shard
plus one module.  A LoRA layer is gathered whole (base weight and adapters) and
written merged, ``W + (alpha / r) B A``, under the base model's key; its adapters
are collected (they are small) for ``lora_adapter/``.

The files are what ``save_pretrained(safe_serialization=True)`` writes:
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json``, ``config.json``, ``generation_config.json``, and
the tokenizer; in the module's own dtype (the training precision).  The same code
exports every ZeRO stage, so the ZeRO-3 export equals the ZeRO-0 one bit for bit.
No Ray here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ift.forward import unwrap
from ift.lora import ADAPTER, is_lora, lora_scalings, merged_weight
from ift.models import whole_parameters

PEFT_PREFIX = "base_model.model."
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


def consolidated_tensors(model: nn.Module, *, keep: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(key, tensor, is_adapter)`` for every persistent tensor of ``model``'s state dict, whole, on
    the host, in state-dict order; a LoRA model's layers come merged under the base keys, and its
    adapter tensors (``is_adapter``) under peft's keys.

    Every rank must run it to the end (the gathers are collectives); only where ``keep`` are tensors
    copied and yielded.  A tied parameter (the same tensor under two names) is yielded once, under
    its first name, as ``save_pretrained`` does.
    """
    lora = {PEFT_PREFIX + path: scale for path, scale in lora_scalings(model).items()} if is_lora(model) else {}
    seen: set[int] = set()
    skip_under: str | None = None  # the LoRA layer being merged: its submodules are done
    for name, module in model.named_modules():
        if skip_under is not None and name.startswith(skip_under):
            continue
        skip_under = None
        prefix = f"{name}." if name else ""
        if name in lora:
            skip_under = prefix
            params = list(module.parameters())
            with whole_parameters(params):
                if keep:
                    yield from _merged_lora_layer(module, prefix, lora[name])
            continue
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        fresh = {id(p) for p in params}
        seen |= fresh
        with whole_parameters(params):
            if not keep:
                continue
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in fresh:
                    yield _base_key(prefix + pname), p.detach().to("cpu", copy=True), False
            for bname, b in module.named_buffers(recurse=False):
                if b is not None and bname not in module._non_persistent_buffers_set:
                    yield _base_key(prefix + bname), b.detach().to("cpu", copy=True), False


def _base_key(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def _merged_lora_layer(module: nn.Module, prefix: str, scale: float) -> Iterator[tuple[str, torch.Tensor, bool]]:
    base = module.base_layer
    a = module.lora_A[ADAPTER].weight.detach().to("cpu", copy=True)
    b = module.lora_B[ADAPTER].weight.detach().to("cpu", copy=True)
    yield f"{prefix}lora_A.{ADAPTER}.weight", a, True
    yield f"{prefix}lora_B.{ADAPTER}.weight", b, True
    yield _base_key(f"{prefix}weight"), merged_weight(base.weight.detach().to("cpu"), a, b, scale), False
    if getattr(base, "bias", None) is not None:
        yield _base_key(f"{prefix}bias"), base.bias.detach().to("cpu", copy=True), False


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes`` (one larger tensor gets a shard of its own),
    named and indexed as ``save_pretrained`` names them."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.files: list[list[str]] = []  # keys of each written shard
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_shard_bytes:
            self._flush()
        self.shard[key] = tensor.contiguous()
        self.shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:

        save_file(self.shard, str(self.out_dir / f"shard-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.shard))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        if self.shard or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out_dir / "shard-00000.tmp", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i:05d}.tmp", self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf_model(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    rank: int,
    adapter_dir: str | os.PathLike | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write ``model`` (a module or a peft model; partitioned by ZeRO-3 or not) as a Hugging Face
    model directory from rank 0; every rank must call it.  A LoRA model is written merged (a plain
    model that loads without peft) and its adapters go to ``adapter_dir``.  The training engine's
    module (an :class:`ift.forward.ObjectiveForward`) is written as the model it holds: the keys
    are the Hugging Face model's, without the wrapper's ``model.``."""
    model = unwrap(model)
    out = Path(out_dir)
    keep = rank == 0
    base = model.get_base_model() if is_lora(model) else model
    writer = ShardWriter(out, max_shard_bytes) if keep else None
    adapters: dict[str, torch.Tensor] = {}
    if keep:
        out.mkdir(parents=True, exist_ok=True)
    for key, tensor, is_adapter in consolidated_tensors(model, keep=keep):
        if is_adapter:
            adapters[key] = tensor
        else:
            writer.add(key, tensor)
    if keep:
        writer.close()
        config = base.config
        config.architectures = [type(base).__name__]
        config.save_pretrained(out)
        if getattr(base, "generation_config", None) is not None and base.can_generate():
            base.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if adapter_dir is not None and adapters:
            # peft writes adapter_model.safetensors + adapter_config.json from the adapters alone.
            model.save_pretrained(str(adapter_dir), state_dict=adapters, safe_serialization=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
