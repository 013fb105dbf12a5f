"""Building what a worker trains: the model (under ZeRO-3 straight into partitions), its tokenizer,
DPO's partitioned reference, the DeepSpeed config and engine.

No Ray here, as in :mod:`pipelines.training.loop`.  DeepSpeed gets a torch optimizer object, because an
optimizer declared in the DeepSpeed config JIT-compiles a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations import HfDeepSpeedConfig

from ift.forward import ObjectiveForward, unwrap
from ift.lora import add_lora
from ift.models import load_model, resolve_attention
from ift.tokenization import load_tokenizer
from pipelines.config import TrainConfig


def trains_in_bf16(cfg: TrainConfig, use_gpu: bool) -> bool:
    """DeepSpeed's bf16 mode: ``deepspeed.precision=bf16``, or ``auto`` on GPUs."""
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)


def model_dtype(cfg: TrainConfig, use_gpu: bool) -> str:
    """``model.dtype``, with ``auto`` resolved to the training precision: a 7B model then loads in
    bf16 (14 GB) rather than float32 (29 GB) on every rank before DeepSpeed takes it."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if trains_in_bf16(cfg, use_gpu) else "float32"


def deepspeed_config(cfg: TrainConfig, use_gpu: bool, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of ``cfg`` (``deepspeed.overrides`` merged last, so they win).

    Under ZeRO-3, with the model's ``hidden_size`` known, the bucket sizes follow the model as the
    Hugging Face Trainer's ``auto`` values do: ``reduce_bucket_size`` h², ``stage3_prefetch_bucket_size``
    0.9·h², ``stage3_param_persistence_threshold`` 10·h.  DeepSpeed's fixed defaults (5e8, 5e7, 1e5
    elements) would let a whole small model's gradients fill one bucket and keep it gathered.
    """
    ds = cfg.deepspeed
    bf16 = trains_in_bf16(cfg, use_gpu)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3 and hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.optimization.micro_batch_size,
        "gradient_accumulation_steps": cfg.accumulation_steps,
        "gradient_clipping": cfg.optimization.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # Gradients of 16-32 micro-batches summed in bf16 lose the small ones (8 bits of mantissa);
        # DeepSpeed otherwise accumulates in the model's dtype.
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.offload_optimizer:
        # The offloaded optimizer must be DeepSpeed's CPU Adam; allow the torch object anyway.
        conf["zero_force_ds_cpu_optimizer"] = False
    _deep_update(conf, ds.overrides)
    return conf


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    o = cfg.optimization
    warmup = int(round(o.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# transformers reads "build into ZeRO-3 partitions" from a weakly referenced HfDeepSpeedConfig; this
# holds it for the latest model built in this process (one per Ray Train worker).
_zero3_construction: Any = None


def partitioned_construction(cfg: TrainConfig, use_gpu: bool) -> None:
    """Under ZeRO-3, make transformers build every model from here on straight into DeepSpeed's
    partitions (``deepspeed.zero.Init`` inside ``from_pretrained`` and ``from_config``), so no rank
    ever holds all parameters; under ZeRO 0-2, build whole models.  Needs the process group up."""
    global _zero3_construction
    _zero3_construction = None  # dropping the last reference switches transformers' check off
    if cfg.deepspeed.zero_stage == 3:
        _zero3_construction = HfDeepSpeedConfig(deepspeed_config(cfg, use_gpu))


def attention(cfg: TrainConfig, use_gpu: bool) -> tuple[str, str]:
    """The attention kernel this worker runs (``model.attn_implementation`` with ``auto`` resolved
    here, :func:`ift.models.resolve_attention`), and why, for the run to say at start."""
    if cfg.model.attn_implementation == "auto" and not use_gpu:
        return "sdpa", "model.attn_implementation=auto: sdpa, this run trains on CPU"
    impl, why = resolve_attention(cfg.model.attn_implementation)
    return str(impl), why


def _load_policy(cfg: TrainConfig, tokenizer, use_gpu: bool) -> torch.nn.Module:
    partitioned_construction(cfg, use_gpu)
    return load_model(
        cfg.model.name,
        dtype=model_dtype(cfg, use_gpu),
        attn_implementation=attention(cfg, use_gpu)[0],
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        seed=cfg.optimization.seed,
        tokenizer=tokenizer,
    )


def build_model_and_tokenizer(cfg: TrainConfig, use_gpu: bool = False):
    """The model to train (under ZeRO-3 built into partitions), with gradient checkpointing and LoRA
    as configured, and its tokenizer."""
    tokenizer = load_tokenizer(
        cfg.model.tokenizer or cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        chat_template=cfg.data.chat_template,
    )
    model = _load_policy(cfg, tokenizer, use_gpu)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    return model, tokenizer


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing of every decoder layer, non-reentrant whatever the transformers
    version's default (4.x: reentrant; PyTorch recommends non-reentrant): the reentrant form runs a nested
    backward per layer and gives a layer's weights no gradient unless one of its inputs requires grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hidden_size(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "hidden_size", None)


def build_engine(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, use_gpu: bool):
    """``deepspeed.initialize`` with a torch AdamW and a LambdaLR schedule.

    The engine's module is ``model`` inside an :class:`ift.forward.ObjectiveForward` (its parameters are
    ``model.*``; :func:`ift.forward.unwrap` gives ``model`` back), so an objective called with the
    engine runs all of a micro-batch's passes in one engine forward (:mod:`ift.forward`)."""
    import deepspeed  # imported where an engine is built: seconds to import, and it logs its accelerator choice

    model = unwrap(model)
    o = cfg.optimization
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    # No empty group: ZeRO drops it, and the scheduler would then count one group more than it steps
    # (LoRA trains only 2-D adapter matrices, so its no-decay group is empty).
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=ObjectiveForward(model),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, use_gpu, _hidden_size(model)),
    )
    return engine


def partitioned_reference(cfg: TrainConfig, tokenizer, use_gpu: bool):
    """DPO's frozen reference for a full (not LoRA) ZeRO-3 run, else None (the objective then copies
    the policy, or switches a LoRA model's adapters off).

    A copy of a partitioned model would be empty, so the start policy is built again into
    partitions and wrapped in a DeepSpeed engine with no optimizer, as TRL prepares its reference:
    each rank holds 1/world of it, and each forward gathers layer by layer like the policy's.
    Every rank must call it, before a resume changes the policy.
    """
    if not (cfg.method.uses_reference and cfg.model.lora is None and cfg.deepspeed.zero_stage == 3):
        return None

    reference = _load_policy(cfg, tokenizer, use_gpu).requires_grad_(False)
    ds = deepspeed_config(cfg, use_gpu, _hidden_size(reference))
    ds["zero_optimization"].pop("offload_optimizer", None)
    ds.pop("zero_force_ds_cpu_optimizer", None)
    import deepspeed  # see build_engine

    engine, *_ = deepspeed.initialize(model=reference, config=ds)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine
