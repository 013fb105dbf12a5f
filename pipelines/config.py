"""The one validated configuration schema for `ift train`, `ift sweep` and every trial.

A config is YAML (see ``pipelines/configs/``), then ``key=value`` overrides with
dotted keys (``optimization.lr=1e-4 method.name=sft``).  Unknown keys and wrong
types are errors that name the key, with a suggestion for near misses.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED_CONFIGS = "pipelines.configs"
DEFAULT_CONFIG = "tiny"
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel; flash_attention_2 needs the flash-attn package and CUDA GPUs "
        "(packed batches then take its varlen path).",
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
    cache_dir: str = Field("ift_cache", description="Where tokenized caches live: a local path or a URI (s3://...).")
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
        False, description="Fuse with a frozen copy of the input embeddings, as the authors' release does."
    )

    def check(self, cfg: TrainConfig) -> None:
        if self.frozen_fusion_embeddings and cfg.deepspeed.zero_stage == 3:
            raise ValueError("method.frozen_fusion_embeddings cannot copy partitioned ZeRO-3 embeddings; use stage 0-2")
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


class TrainConfig(_Section):
    run_name: str = Field("ift-tiny", description="Run name; re-running with the same name resumes.")
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

    @model_validator(mode="before")
    @classmethod
    def _method_name_defaults_to_ift(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": DEFAULT_METHOD, **data["method"]}}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
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

    def fingerprint(self) -> str:
        """A short hash of the resolved config, for tags and run identity."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str, allowed: dict[tuple, list[str]]) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        section = tuple(p for p in loc[:-1] if not p.isdigit())
        method = None
        if loc[:1] == ("method",) and len(loc) > 2 and loc[1] in METHOD_CONFIGS:
            # pydantic puts the chosen method's tag in the path: method.sft.lam is the user's method.lam
            method, loc = loc[1], ("method",) + loc[2:]
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            names = allowed.get(section, [])
            close = difflib.get_close_matches(loc[-1], names, n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            what = f"unknown key for method '{method}' (its keys: {', '.join(names)})" if method else "unknown key"
            lines.append(f"  {key}: {what}{hint}")
        elif e["type"] == "union_tag_invalid" and loc == ("method",):
            got = (e.get("ctx") or {}).get("tag")
            lines.append(f"  method.name: unknown method {got!r} (choose from {', '.join(METHOD_CONFIGS)})")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            if not loc:  # a check across sections: its message names the keys
                lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, list[str]]:
    """Section path (list indices left out) -> the keys that section accepts."""
    out = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        sections = [
            c
            for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
            if isinstance(c, type) and issubclass(c, BaseModel)
        ]
        if len(sections) > 1 and field.discriminator:  # one class per tag (the method): keys per tag, and all
            for section in sections:
                tag = section.model_fields[field.discriminator].default
                out.update(_allowed_keys(section, prefix + (name, tag)))
            out[prefix + (name,)] = list(dict.fromkeys(k for c in sections for k in c.model_fields))
        elif sections:
            out.update(_allowed_keys(sections[0], prefix + (name,)))
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {dotted}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _method_name_first(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``method.name`` is applied before the other overrides, so ``method.<option>`` is checked against the
    method the run will train with, wherever it stands on the command line."""
    return sorted(items, key=lambda kv: kv[0] != "method.name")


def _set_override(tree: dict, dotted: str, value: Any) -> None:
    """``_set_dotted``, except that switching ``method.name`` drops the options of the previous method
    that the new one does not have (a config's ``method.lam`` means nothing to ``method.name=sft``)."""
    method = tree.get("method")
    if dotted == "method.name" and isinstance(method, dict) and value in METHOD_CONFIGS:
        if method.get("name", DEFAULT_METHOD) != value:
            fields = METHOD_CONFIGS[value].model_fields
            tree["method"] = {k: v for k, v in method.items() if k in fields}
    _set_dotted(tree, dotted, value)


def _parse_value(raw: str) -> Any:
    if raw == "":
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string; people mean a number
            return float(value)
        except ValueError:
            pass
    return value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x, y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optimization.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        parsed.append((key.strip(), _parse_value(raw)))
    return parsed


def split_config_argument(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key=value ...`` from the command line -> ``(CONFIG or None, overrides)``.

    The first item is the config (a path or a packaged name) unless it has an ``=``.
    """
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside ``pipelines/configs`` (``tiny`` -> tiny.yaml)."""
    return Path(str(resources.files(PACKAGED_CONFIGS).joinpath(f"{name}.yaml")))


def packaged_config_names() -> list[str]:
    root = resources.files(PACKAGED_CONFIGS)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_data_paths(tree: dict, base_dir: str | os.PathLike) -> None:
    """Make relative data paths in a config tree absolute against ``base_dir``, in place.

    A YAML's paths are relative to that YAML's folder; ``key=value`` overrides are
    relative to the working directory of the person who typed them.  Either way they
    are made absolute once, at load time: Ray tasks and sweep trials run elsewhere.
    Hub ids (``hf:``), URIs and absolute paths are left alone, and so is a relative
    path that does not exist under ``base_dir`` (it may be meant for another base).
    """
    for split in ("train", "validation"):
        for src in (tree.get("data") or {}).get(split) or []:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                p = src["path"]
                if not (p.startswith("hf:") or "://" in p or os.path.isabs(p)):
                    candidate = Path(base_dir) / p
                    if candidate.exists() or any(ch in p for ch in "*?["):
                        src["path"] = os.path.abspath(candidate)


def resolve_cache_dir(tree: dict) -> None:
    """A local ``data.cache_dir`` becomes absolute against the working directory, in place:
    sweep trials and Ray tasks run elsewhere and must find the same cache."""
    data = tree.get("data")
    if isinstance(data, dict) and isinstance(data.get("cache_dir"), str) and "://" not in data["cache_dir"]:
        data["cache_dir"] = os.path.abspath(data["cache_dir"])


def read_yaml_mapping(file: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); anything else is a ConfigError."""
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (default: the packaged ``tiny``), apply overrides, validate.

    ``path`` may also name a packaged config (``tiny``, ``mistral-7b-ift`` ...; ``ift configs`` lists them).
    """
    if path is None:
        file = packaged_config_path(DEFAULT_CONFIG)
    else:
        file = Path(path)
        if not file.exists() and (file.suffix == "" and packaged_config_path(str(path)).exists()):
            file = packaged_config_path(str(path))
        if not file.exists():
            raise ConfigError(
                f"config file '{path}' not found; packaged configs are: {', '.join(packaged_config_names())}"
            )
    tree = read_yaml_mapping(file)
    resolve_data_paths(tree, file.parent)
    for key, value in _method_name_first(parse_overrides(overrides or [])):
        try:
            _set_override(tree, key, value)
        except (IndexError, ValueError, TypeError) as exc:
            raise ConfigError(f"override {key}: {exc}") from exc
    resolve_data_paths(tree, Path.cwd())
    if isinstance(tree.get("data"), dict):
        tree["data"].setdefault("cache_dir", DataConfig.model_fields["cache_dir"].default)
    resolve_cache_dir(tree)
    source = f"{file}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    try:
        cfg = TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, _allowed_keys(TrainConfig))) from None
    return cfg


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with dotted-key values set and re-validated (used by sweeps);
    relative data paths among them resolve against the working directory."""
    tree = cfg.model_dump(mode="python")
    for key, value in _method_name_first(list(values.items())):
        _set_override(tree, key, value)
    resolve_data_paths(tree, Path.cwd())
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "overrides", _allowed_keys(TrainConfig))) from None


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted-key view of the resolved config (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    return out


def describe_schema() -> str:
    """Every key with its default and help text (``ift train --help-config``)."""
    lines = []

    def row(key: str, field: Any, note: str = "") -> None:
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"{key:42s} {default:>14s}  {note}{field.description or ''}")

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            if field.discriminator:  # the method: its name, then each method's own options
                lines.append(f"{key + '.name':42s} {repr(DEFAULT_METHOD):>14s}  one of {', '.join(METHOD_CONFIGS)}")
                for tag, cls in METHOD_CONFIGS.items():
                    for option, sub in cls.model_fields.items():
                        if option != field.discriminator:
                            row(f"{key}.{option}", sub, note=f"[{tag}] ")
                continue
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            row(key, field)

    walk(TrainConfig, "")
    return "\n".join(lines)
