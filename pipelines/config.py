"""The one validated configuration schema for `ift train`, `ift sweep` and every trial.

Loading it from YAML and ``key=value`` overrides, with errors that name the key:
:mod:`pipelines.config_loading`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ift.chat_templates import is_inline_template, resolve_chat_template, shipped_chat_templates

# The store every command defaults to: a sqlite file in the working directory
# (made absolute by pipelines.tracking.runs.resolve_tracking_uri, so Ray workers hit the same file).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names (suffixes) that get adapters; Llama/Mistral attention and MLP projections.",
    )


class ModelConfig(_Section):
    name: str = Field("tiny", description="Preset ('tiny', 'tiny-100m'), hub id, or local path of a causal LM.")
    tokenizer: str | None = Field(None, description="Tokenizer id/path; defaults to the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the weights load in; auto = bfloat16 when DeepSpeed trains in bf16 (deepspeed.precision), "
        "else float32 (DeepSpeed keeps fp32 master weights either way).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel; auto = flash_attention_2 on CUDA workers with the flash-attn package, else "
        "sdpa (each run says which at start); flash_attention_2 needs both (packed batches take its varlen path).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless asked.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters (peft) instead of all weights; unset = full fine-tuning."
    )


class DataSource(_Section):
    path: str = Field(..., description="JSONL/Parquet path or glob, or 'hf:<dataset id>' for a hub dataset.")
    split: str = Field("train", description="Split of a hub dataset.")
    weight: float = Field(1.0, gt=0, description="Mixture weight: rows are sampled in proportion to it.")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows of the source.")


class DataConfig(_Section):
    train: list[DataSource] = Field(..., min_length=1, description="Training sources (a weighted mixture).")
    validation: list[DataSource] = Field(default_factory=list, description="Validation sources.")
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train when no validation source is given."
    )
    max_length: int = Field(512, gt=8, description="Maximum tokens per sequence.")
    truncation: Literal["truncate_left", "truncate_right", "drop"] = Field(
        "truncate_left", description="What to do with rows longer than max_length."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad row naming file and row; 'skip' counts and reports."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template, for a base model whose tokenizer has none (or to replace its own): a template "
        "shipped with ift (chatml, zephyr) or a path to a Jinja file; unset = the tokenizer's own.",
    )
    shuffle_buffer_size: int = Field(
        10_000, ge=0, description="Per-epoch local shuffle buffer (rows), seeded per epoch and rank; 0 = fixed order."
    )
    tokenize_batch_size: int = Field(256, gt=0, description="Rows per Ray Data map_batches call.")
    tokenize_concurrency: int | None = Field(
        None, gt=0, description="Tokenizer actors (each loads the tokenizer once); unset = one per CPU left free."
    )
    cache: bool = Field(
        False,
        description="Train from the tokenized cache in cache_dir (`ift data prepare` builds it; built if missing).",
    )
    cache_dir: str = Field(
        "ift_cache",
        description="Where tokenized caches and the source files' scan index (<cache_dir>/index) live: a local "
        "path or a URI (s3://...).",
    )
    content_hash: bool = Field(
        False,
        description="Fingerprint source files by a sha256 of their bytes (each new file read whole once) instead "
        "of their identity (size and modification time or version), which needs no read.",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: sequences back to back in rows of pack_length tokens, attention kept "
        "within each sequence; a micro-batch is micro_batch_size such rows (every method).",
    )
    pack_length: int | None = Field(
        None,
        gt=8,
        description="Tokens per packed row (a micro-batch: micro_batch_size rows); unset = max_length, or "
        "2 x max_length for DPO/ORPO, whose pairs pack chosen and rejected side by side.",
    )
    packing_strategy: Literal["best_fit_decreasing", "greedy"] = Field(
        "best_fit_decreasing", description="How a window of rows is packed: best fit decreasing, or greedy in order."
    )
    packing_window: int = Field(
        1024, gt=0, description="Rows packed together (after the local shuffle): larger packs tighter."
    )

    @field_validator("chat_template")
    @classmethod
    def _chat_template_exists(cls, value: str | None) -> str | None:
        """A shipped name stays a name; a Jinja file's path becomes absolute (against the working directory:
        Ray workers may run elsewhere); anything else is refused here rather than in a worker."""
        if value is None or value in shipped_chat_templates() or is_inline_template(value):
            return value
        resolve_chat_template(value)  # a ValueError naming the shipped templates when there is no such file
        return os.path.abspath(os.path.expanduser(value))

    def resolved_pack_length(self, paired: bool) -> int:
        """Tokens per packed row: ``pack_length``, or room for the longest example (a pair: two sequences)."""
        return self.pack_length if self.pack_length is not None else self.max_length * (2 if paired else 1)


class _MethodSection(_Section):
    """What every method config says about itself: whether it trains on (chosen, rejected) pairs and
    whether it trains against a frozen reference policy.  One subclass per method, chosen by ``name``."""

    paired: ClassVar[bool] = False  # reads preference rows (chosen, rejected) instead of SFT rows
    uses_reference: ClassVar[bool] = False  # scores against a frozen copy of the start policy

    @property
    def precomputed_reference(self) -> bool:
        """Whether the reference log-probs are computed once before training (the reference is then freed)."""
        return False

    def hyperparameters(self) -> dict[str, Any]:
        """The method's own options (everything but ``name``): its model versions' tags and trial params."""
        return self.model_dump(mode="json", exclude={"name"})

    def check(self, cfg: TrainConfig) -> None:
        """Combinations with the rest of the config this method cannot train with (raise ValueError)."""


class IFTConfig(_MethodSection):
    """Intuitive Fine-Tuning: the fused-embedding pass of eq. (17) weighted by the discounted scan of eq. (22)."""

    name: Literal["ift"] = "ift"
    lam: float = Field(0.2, ge=0, le=1, description="IFT λ of eq. (17), or its maximum under a schedule.")
    decay: float = Field(0.95, ge=0, le=1, description="IFT propagation decay γ of eq. (22) (0 turns it off).")
    lam_schedule: Literal["constant", "linear_warmup"] = Field("constant", description="λ over steps.")
    lam_min: float = Field(0.0, ge=0, le=1, description="Start λ of the linear warm-up.")
    lam_warmup_steps: int = Field(0, ge=0, description="Steps of the λ warm-up.")
    lam_jitter_std: float = Field(0.0, ge=0, description="Std of Gaussian jitter on λ per step.")
    detach_weights: bool = Field(False, description="Stop gradients through the IFT weights.")
    prediction: Literal["greedy", "sample"] = Field("greedy", description="How IFT takes the model's own tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (prediction=sample).")
    top_k: int = Field(0, ge=0, description="Top-k filter (prediction=sample; 0 = off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Top-p filter (prediction=sample).")
    frozen_fusion_embeddings: bool = Field(
        False,
        description="Embed the model's predictions in the fused input with the embedding table out of the gradient, "
        "as the authors' release does (a frozen copy refreshed from the policy every step); any ZeRO stage.",
    )

    def check(self, cfg: TrainConfig) -> None:
        if self.lam_schedule == "linear_warmup" and self.lam_min > self.lam:
            raise ValueError("method.lam_min must not exceed method.lam (the warm-up's end value)")


class SFTConfig(_MethodSection):
    """Supervised fine-tuning: the response NLL of eq. (27)."""

    name: Literal["sft"] = "sft"


class DPOConfig(_MethodSection):
    """Sigmoid DPO (eq. 32) against the start policy; β = 0.1 as in the paper's §5.1."""

    paired: ClassVar[bool] = True
    uses_reference: ClassVar[bool] = True

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="DPO β (the paper's 0.1).")
    precompute_reference: bool = Field(
        False, description="Compute reference log-probs once before training and free the reference model."
    )

    @property
    def precomputed_reference(self) -> bool:
        return self.precompute_reference


class ORPOConfig(_MethodSection):
    """ORPO (Hong et al.): chosen NLL plus β × the odds-ratio term, no reference; β = 0.25 as in §5.1."""

    paired: ClassVar[bool] = True

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.25, gt=0, description="ORPO β, the odds-ratio term's weight (the paper's 0.25).")


METHOD_CONFIGS: dict[str, type[_MethodSection]] = {
    cls.model_fields["name"].default: cls for cls in (IFTConfig, SFTConfig, DPOConfig, ORPOConfig)
}
MethodConfig = Annotated[IFTConfig | SFTConfig | DPOConfig | ORPOConfig, Field(discriminator="name")]
DEFAULT_METHOD = "ift"


class OptimizationConfig(_Section):
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear LR warm-up.")
    epochs: int = Field(1, gt=0, description="Passes over the training data (unless max_steps stops first).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(
        8, gt=0, description="Sequences (packed rows, with data.packing) per worker per forward/backward."
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Sequences per optimizer step over all workers (the paper's 512): the recipe's invariant. "
        "Accumulation follows as global / (micro_batch_size x scaling.num_workers), so more GPUs keep the same "
        "optimizer steps and LR schedule; unset = micro_batch_size x accumulation x workers.",
    )
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="Micro-batches per optimizer step; unset = from global_batch_size, else 1."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")
    seed: int = Field(42, description="Seeds model init, data order and sampling.")
    eval_every_n_steps: int = Field(0, ge=0, description="Validation loss every N steps (0 = only at the end).")
    log_every_n_steps: int = Field(1, gt=0, description="Log metrics to MLflow every N steps.")


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload the optimizer state to CPU.")
    offload_param: bool = Field(False, description="ZeRO-3: offload parameters to CPU.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config keys merged last.")


class ScalingConfig(_Section):
    num_workers: int = Field(2, gt=0, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto",
        description="auto = GPUs when gpus_per_worker > 0 and the cluster has GPU nodes or can autoscale them.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed).")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per worker when use_gpu.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers on nodes: PACK fills few nodes (fast collectives), SPREAD "
        "one per node where it can (a lost node takes fewer ranks); STRICT_ forms fail rather than bend.",
    )
    worker_mmap_threshold_bytes: int = Field(
        131072,
        ge=0,
        le=32 * 1024 * 1024,
        description="glibc's mmap threshold fixed in each worker, so freed tensors leave RSS at once "
        "(pipelines/training/host_memory.py); 0 keeps glibc's default, which lets freed buffers stay resident.",
    )


class CheckpointingConfig(_Section):
    storage_path: str = Field("ift_runs", description="Where runs and checkpoints live (local dir or URI).")
    every_n_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps (and at the end).")
    keep: int = Field(2, gt=0, description="Checkpoints kept (num_to_keep).")
    max_failures: int = Field(2, ge=-1, description="Worker failures to recover from (-1 = unlimited).")


class MLflowConfig(_Section):
    enabled: bool = Field(True, description="Track the run in MLflow.")
    tracking_uri: str = Field(
        DEFAULT_TRACKING_URI, description="Tracking store; relative sqlite paths are made absolute."
    )
    experiment: str = Field("ift", description="MLflow experiment name.")
    registered_model_name: str | None = Field("ift-tiny", description="Register the final model under this name.")


class EvalConfig(_Section):
    at_end: bool = Field(False, description="Run the offline benchmark tasks on the final model.")
    tasks: list[str] = Field(default_factory=list, description="Tasks (empty = the offline preset).")
    limit: int | None = Field(None, gt=0, description="Examples per task.")


# Keys that change nothing a checkpoint holds or a run trains on: where it is logged and stored, how
# often it reports, how rows reach the workers.  Every other key is a training setting, and a resume
# under changed training settings is refused (pipelines.training.state.check_training_settings).
NON_TRAINING_KEYS = (
    "run_name",
    "mlflow.",
    "eval.",
    "checkpointing.",
    "optimization.log_every_n_steps",
    "optimization.eval_every_n_steps",
    "data.cache",  # the cache holds the same tokens the stream would make (also data.cache_dir)
    "data.tokenize_batch_size",
    "data.tokenize_concurrency",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.gpus_per_worker",
    "scaling.worker_mmap_threshold_bytes",
    "scaling.placement_strategy",
)


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict (lists of sections as ``data.train.0.path``)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_tree(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(tree, list) and tree and isinstance(tree[0], dict):
        for i, v in enumerate(tree):
            out.update(flatten_tree(v, f"{prefix}.{i}"))
    else:
        out[prefix] = tree
    return out


class TrainConfig(_Section):
    run_name: str | None = Field(
        None,
        description="Run name: re-running under it resumes the run, and training settings that differ from the "
        "run's are refused (ift train --resume-with-changes continues anyway).  Unset = "
        "<config>-<method>-<hash of the training settings>: the same command resumes, a changed one is a new run.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(
        default_factory=IFTConfig, description="The training method: its `name` (ift, sft, dpo, orpo) and options."
    )
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    # What loading said about how it read the config (e.g. validation held out of new training
    # data); a run prints these first.
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What loading did that the user did not write (a run prints these first)."""
        return self._notes

    @model_validator(mode="before")
    @classmethod
    def _method_name_defaults_to_ift(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": DEFAULT_METHOD, **data["method"]}}
        return data

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> TrainConfig:
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if self.model.attn_implementation == "flash_attention_2" and self.scaling.use_gpu is False:
            raise ValueError(
                "model.attn_implementation=flash_attention_2 needs CUDA GPUs but scaling.use_gpu is false; "
                "use sdpa on CPU"
            )
        self._check_global_batch()
        paired = self.method.paired
        longest = self.data.max_length * (2 if paired else 1)
        if self.data.packing and self.data.resolved_pack_length(paired) < longest:
            what = "a pair of max_length sequences (packed side by side)" if paired else "a sequence"
            raise ValueError(
                f"data.pack_length={self.data.pack_length} is shorter than {what}: {longest} tokens with "
                f"data.max_length={self.data.max_length}; raise data.pack_length or lower data.max_length"
            )
        self.method.check(self)
        if self.run_name is None:
            # The config's name comes from the loader (pipelines.config_loading.load_config).
            config_name = (info.context or {}).get("config_name", "ift")
            # Set past validate_assignment, which would run these checks again.
            self.__dict__["run_name"] = f"{config_name}-{self.method.name}-{self.training_fingerprint()[:8]}"
        return self

    def _check_global_batch(self) -> None:
        o, workers = self.optimization, self.scaling.num_workers
        if o.global_batch_size is None:
            return
        per_step = o.micro_batch_size * workers
        if o.global_batch_size % per_step:
            raise ValueError(
                f"optimization.global_batch_size={o.global_batch_size} is not a multiple of "
                f"optimization.micro_batch_size={o.micro_batch_size} x scaling.num_workers={workers} = {per_step}; "
                "change one of the three"
            )
        derived = o.global_batch_size // per_step
        if o.gradient_accumulation_steps not in (None, derived):
            raise ValueError(
                f"optimization.gradient_accumulation_steps={o.gradient_accumulation_steps} disagrees with "
                f"optimization.global_batch_size={o.global_batch_size} = micro_batch_size {o.micro_batch_size} x "
                f"{workers} workers x accumulation {derived}; set only global_batch_size"
            )

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: from ``global_batch_size`` when set, else the configured count."""
        o = self.optimization
        if o.global_batch_size is not None:
            return o.global_batch_size // (o.micro_batch_size * self.scaling.num_workers)
        return o.gradient_accumulation_steps or 1

    @property
    def global_batch(self) -> int:
        """Sequences (packed rows, with packing) per optimizer step over all workers."""
        return self.optimization.micro_batch_size * self.accumulation_steps * self.scaling.num_workers

    def training_settings(self) -> dict[str, Any]:
        """The settings that decide what a run trains (dotted keys; :data:`NON_TRAINING_KEYS` left out):
        what a run records when it starts and what a resume must match."""
        flat = flatten_tree(self.model_dump(mode="json"))
        return {k: v for k, v in flat.items() if not k.startswith(NON_TRAINING_KEYS)}

    def training_fingerprint(self) -> str:
        """A hash of :meth:`training_settings`: equal for configs that train the same run."""
        text = json.dumps(self.training_settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def fingerprint(self) -> str:
        """A short hash of the resolved config, for tags and run identity."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
