"""`ift train --dry-run`: will the model states fit, per GPU and per host, before anything starts?

The model is built on PyTorch's ``meta`` device (shapes only, no memory; a hub
model needs only its ``config.json``) to count parameters, and the bytes per
parameter follow the ZeRO paper's accounting (Rajbhandari et al., 2020, §3)
for mixed-precision Adam: 2 bytes of bf16/fp16 weights + 2 of gradients + 12 of
optimizer state (fp32 master weights, momentum, variance) = 16 per trained
parameter, 16 in fp32 training too (4 + 4 + 8).  ZeRO-1 partitions the optimizer
state over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the
weights; offloading moves the optimizer state (and with ``offload_param`` the
weights) to host memory.  LoRA trains only the adapters: the base weights cost
their 2 (or 4) bytes and nothing else.  DPO's live reference model is a second,
copy of the weights on every GPU, partitioned like the policy's under ZeRO-3 (none with
LoRA: the adapters switch off; none with ``precompute_reference``).

Two buffers of DeepSpeed's own come on top, as its estimators count them
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``,
which the tests compare against): in bf16 the optimizer's partition keeps an fp32 copy of
its gradients (4 bytes per trained parameter, partitioned from ZeRO-1 on), and under
ZeRO-3 the largest layer is gathered whole for its forward and backward (4 bytes per
parameter of that layer).  The ZeRO-2 figure equals DeepSpeed's estimator; for ZeRO-3 ours
is larger by the 16-bit gradient partition (2 bytes per parameter over the ranks) that
DeepSpeed's stage 3 keeps and its estimator leaves out.

Activations are a rough upper figure for one micro-batch (Korthikanti et al.,
2022, eq. 1, without sequence parallelism: ``s·b·h·(34 + 5·a·s/h)`` bytes per
layer in 16-bit; with gradient checkpointing only each layer's input,
``2·s·b·h``, plus one layer's full set), plus the fp32 logits and their
log-softmax.  Allocator fragmentation, CUDA context (~0.5–1 GB) and DeepSpeed's
communication buckets come on top: read the total as a floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ift.lora import add_lora
from ift.models import build_preset_config
from ift.tokenization import check_local_path, is_preset, load_tokenizer
from pipelines.config import TrainConfig
from pipelines.training.build import trains_in_bf16

GIB = 2**30
# config.json of the packaged paper configs' models, for a dry run without hub access (shapes only).
BUNDLED_MODEL_CONFIGS = Path(__file__).parent.parent / "configs" / "models"


@dataclass
class ModelShape:
    parameters: int
    trainable: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    largest_layer: int = 0  # parameters of the largest module, as DeepSpeed counts them (gathered whole under ZeRO-3)


@dataclass
class MemoryEstimate:
    shape: ModelShape
    workers: int
    zero_stage: int
    bf16: bool
    per_gpu: dict[str, float] = field(default_factory=dict)  # bytes on each GPU (or worker, on CPU)
    per_host: dict[str, float] = field(default_factory=dict)  # bytes in host memory per worker (offload)

    @property
    def gpu_total(self) -> float:
        return sum(self.per_gpu.values())


def model_shape(cfg: TrainConfig) -> ModelShape:
    """Parameter counts and dimensions, from a model built on the meta device."""

    if is_preset(cfg.model.name):
        config = build_preset_config(cfg.model.name, load_tokenizer(cfg.model.name))
    else:
        check_local_path(cfg.model.name)
        try:
            config = AutoConfig.from_pretrained(
                cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            )
        except OSError:
            bundled = BUNDLED_MODEL_CONFIGS / cfg.model.name.replace("/", "--")
            if not (bundled / "config.json").is_file():
                raise
            config = AutoConfig.from_pretrained(bundled)  # no hub here: the paper's models ship their config.json
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    trainable = total
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(
        largest_layer=largest,
        parameters=total,
        trainable=trainable,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        vocab=int(config.vocab_size),
    )


def estimate_memory(cfg: TrainConfig, shape: ModelShape, *, use_gpu: bool) -> MemoryEstimate:
    """Bytes per GPU (and per host, for offloaded state) of one training worker: see the module docstring."""

    bf16 = trains_in_bf16(cfg, use_gpu)
    n = cfg.scaling.num_workers
    stage = cfg.deepspeed.zero_stage
    weight_bytes = 2 if bf16 else 4
    frozen = shape.parameters - shape.trainable
    est = MemoryEstimate(shape=shape, workers=n, zero_stage=stage, bf16=bf16)

    weights = (shape.trainable + frozen) * weight_bytes / (n if stage == 3 else 1)
    grads = shape.trainable * weight_bytes / (n if stage >= 2 else 1)
    # Mixed precision: fp32 master + momentum + variance; fp32: momentum + variance.
    optimizer = shape.trainable * (12 if bf16 else 8) / (n if stage >= 1 else 1)
    (est.per_host if cfg.deepspeed.offload_param else est.per_gpu)["weights"] = weights
    est.per_gpu["gradients"] = grads
    (est.per_host if cfg.deepspeed.offload_optimizer else est.per_gpu)["optimizer state"] = optimizer
    if bf16:  # DeepSpeed's fp32 copy of the gradients, beside the optimizer state it serves
        fp32_grads = shape.trainable * 4 / (n if stage >= 1 else 1)
        (est.per_host if cfg.deepspeed.offload_optimizer else est.per_gpu)["fp32 gradients"] = fp32_grads
    if stage == 3:
        est.per_gpu["largest layer, gathered"] = 4 * shape.largest_layer
    live_reference = cfg.method.uses_reference and cfg.model.lora is None and not cfg.method.precomputed_reference
    if live_reference:  # under ZeRO-3 partitioned like the policy (pipelines.training.build.partitioned_reference)
        est.per_gpu["DPO reference copy"] = shape.parameters * weight_bytes / (n if stage == 3 else 1)

    s, b, h, a, layers = cfg.data.max_length, cfg.optimization.micro_batch_size, shape.hidden, shape.heads, shape.layers
    sequences = b * (2 if cfg.method.paired else 1)  # DPO/ORPO: chosen and rejected in one forward
    full_layer = s * sequences * h * (34 + 5 * a * s / h)
    if cfg.model.gradient_checkpointing:
        est.per_gpu["activations"] = 2 * s * sequences * h * layers + full_layer
    else:
        est.per_gpu["activations"] = full_layer * layers
    # fp32 logits and their log-softmax; IFT's no-grad prediction pass makes its own (freed before).
    est.per_gpu["logits"] = 2 * 4 * s * sequences * shape.vocab
    return est


@dataclass
class CheckpointSize:
    """Bytes of one checkpoint in ``checkpointing.storage_path``, all ranks' files together."""

    deepspeed_state: float  # every checkpoint: what a resume loads
    model_export: float  # the final checkpoint only: the Hugging Face model (merged under LoRA)

    def kept(self, keep: int) -> float:
        """The run's storage at its end: ``keep`` checkpoints, the last of them with the model."""
        return keep * self.deepspeed_state + self.model_export


def checkpoint_size(cfg: TrainConfig, shape: ModelShape, *, use_gpu: bool) -> CheckpointSize:
    """What DeepSpeed's ``save_checkpoint`` writes, as measured on its files (the tests compare).

    The module's weights in the training dtype (2 bytes in bf16, 4 in fp32), except that under
    ZeRO-3 only the frozen ones (LoRA's base) are written outside the optimizer state; and the
    optimizer state of each trained parameter: its fp32 master copy, Adam's momentum and variance
    (12 bytes), or only the two moments (8) in fp32 without ZeRO, where the module's weights are
    the master copy.  The final export is the model's weights in the training dtype.
    """
    weight_bytes = 2 if trains_in_bf16(cfg, use_gpu) else 4
    stage = cfg.deepspeed.zero_stage
    frozen = shape.parameters - shape.trainable
    weights = (frozen if stage == 3 else shape.parameters) * weight_bytes
    optimizer = shape.trainable * (8 if weight_bytes == 4 and stage == 0 else 12)
    merged = shape.parameters - (shape.trainable if cfg.model.lora is not None else 0)
    return CheckpointSize(deepspeed_state=weights + optimizer, model_export=merged * weight_bytes)


def format_size(n: float) -> str:
    # The largest unit that keeps three digits before the point: 1000 MiB reads 0.98 GiB.
    return f"{n / GIB:8.2f} GiB" if n >= 1000 * 2**20 else f"{n / 2**20:8.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render(cfg: TrainConfig, est: MemoryEstimate, *, use_gpu: bool) -> str:
    shape = est.shape
    where = "GPU" if use_gpu else "worker (CPU run)"
    lines = [
        f"model {cfg.model.name}: {_count(shape.parameters)} parameters, {_count(shape.trainable)} trained"
        + (f" (LoRA r={cfg.model.lora.r})" if cfg.model.lora is not None else ""),
        f"{est.workers} workers, ZeRO-{est.zero_stage}, {'bf16' if est.bf16 else 'fp32'}, micro-batch "
        f"{cfg.optimization.micro_batch_size} x {cfg.data.max_length} tokens"
        + (", gradient checkpointing" if cfg.model.gradient_checkpointing else ""),
        f"estimated memory per {where}:",
    ]
    for k, v in est.per_gpu.items():
        lines.append(f"  {k:<22} {format_size(v)}")
    lines.append(f"  {'total (a floor)':<22} {format_size(est.gpu_total)}")
    for k, v in est.per_host.items():
        lines.append(f"  host, {k:<16} {format_size(v)} (offloaded)")
    size = checkpoint_size(cfg, shape, use_gpu=use_gpu)
    keep = cfg.checkpointing.keep
    lines += [
        f"checkpoints in {cfg.checkpointing.storage_path}:",
        f"  DeepSpeed state, each  {format_size(size.deepspeed_state)}",
        f"  final model export     {format_size(size.model_export)}",
        f"  kept at the end        {format_size(size.kept(keep))} (checkpointing.keep={keep})",
    ]
    return "\n".join(lines)
