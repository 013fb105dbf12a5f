"""One objective per method, built from that method's config class (:mod:`pipelines.config`).

An :class:`Objective` is built once per worker (it may hold state: IFT's λ
schedule and RNGs, DPO's frozen reference) and called once per micro-batch with
the model (a module or a DeepSpeed engine) and a collated batch.  Called with the training engine
(whose module is an :class:`ift.forward.ObjectiveForward`), every pass the method makes on the
micro-batch runs inside one forward of the engine: one root forward per micro-batch, the order
ZeRO-3 records and prefetches by (:mod:`ift.forward`).  Adding an option
to a method is one field in its config class and its use in its objective here;
nothing dispatches on a method's name (:data:`OBJECTIVES` is keyed by config class).
No Ray here.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ift.forward import run_objective, unwrap
from ift.lora import adapters_disabled, is_lora
from ift.objectives import (
    LambdaSchedule,
    ObjectiveOutput,
    dpo_batch_loss,
    ift_loss,
    orpo_batch_loss,
    reference_pair_logps,
    sft_loss,
)
from pipelines.config import DPOConfig, IFTConfig, MethodConfig, ORPOConfig, SFTConfig

Batch = dict[str, Any]
ReferenceTable = dict[tuple[str, int], tuple[float, float]]


class Objective(abc.ABC):
    """A method's loss on one micro-batch.

    ``response_prefix`` names the batch keys that hold the sequences whose NLL is
    comparable across methods ("" for SFT-format batches, "chosen_" for pairs).
    """

    response_prefix = ""

    def __init__(self, cfg: MethodConfig, model: nn.Module, device: torch.device, *, seed: int, rank: int = 0):
        self.cfg = cfg

    def __call__(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        """The loss and metrics of ``batch`` at optimizer step ``step`` (``validation``: no noise, no state
        change), every pass inside one forward of ``model`` when it is the training engine
        (:func:`ift.forward.run_objective`)."""
        return run_objective(model, self.compute, batch=batch, step=step, validation=validation)

    @abc.abstractmethod
    def compute(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        """:meth:`__call__` on ``model`` itself: each call of ``model`` it makes is a forward of its own."""

    @property
    def can_validate(self) -> bool:
        """Whether the objective can be computed on unseen (validation) batches."""
        return True


class SFTObjective(Objective):
    """Paper eq. (27): the mean per-sequence NLL of the response tokens."""

    def compute(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        return sft_loss(
            model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
            position_ids=batch.get("position_ids"),
        )  # fmt: skip


class IFTObjective(Objective):
    """Paper eqs. (17) and (22) through :func:`ift.objectives.ift_loss`, with the λ schedule.

    λ jitter draws from one generator seeded identically on every rank (all ranks
    train with the same λ); sampled predictions draw per rank.  Validation uses the
    schedule's noiseless λ, so validation losses are comparable across steps.
    """

    def __init__(self, cfg: IFTConfig, model: nn.Module, device: torch.device, *, seed: int, rank: int = 0):
        super().__init__(cfg, model, device, seed=seed, rank=rank)
        self.schedule = LambdaSchedule(
            lam_max=cfg.lam,
            kind=cfg.lam_schedule,
            lam_min=cfg.lam_min,
            warmup_steps=cfg.lam_warmup_steps,
            jitter_std=cfg.lam_jitter_std,
        )
        self.lam_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator(device=device).manual_seed(seed + 1000 + rank)

    def lam(self, step: int, *, validation: bool = False) -> float:
        return self.schedule.base(step) if validation else self.schedule(step, self.lam_generator)

    def compute(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        m = self.cfg
        return ift_loss(
            model,
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["labels"],
            position_ids=batch.get("position_ids"),
            lam=self.lam(step, validation=validation),
            decay=m.decay,
            detach_weights=m.detach_weights,
            prediction=m.prediction,
            temperature=m.temperature,
            top_k=m.top_k,
            top_p=m.top_p,
            generator=self.sample_generator if m.prediction == "sample" else None,
            detach_prediction_embeddings=m.frozen_fusion_embeddings,
        )


class DPOObjective(Objective):
    """Paper eq. (32) (sigmoid DPO) against the start policy: a frozen copy of the model, or, for a
    LoRA model, the same model with its adapters switched off (no copy).

    With ``precompute_reference`` the reference log-probs of every training pair
    are computed once (:meth:`precompute_reference`) and the copy is freed; the
    objective then needs them attached to each batch and cannot score unseen pairs.
    """

    response_prefix = "chosen_"

    def __init__(
        self,
        cfg: DPOConfig,
        model: nn.Module,
        device: torch.device,
        *,
        seed: int,
        rank: int = 0,
        reference: nn.Module | None = None,
    ):
        """``reference``: the frozen start policy when the caller built it (a ZeRO-3 engine:
        ``pipelines.training.build.partitioned_reference``); otherwise a copy of ``model`` is made here."""
        super().__init__(cfg, model, device, seed=seed, rank=rank)
        model = unwrap(model)
        self.beta = cfg.beta
        self.lora_model = model if is_lora(model) else None
        self.reference: nn.Module | None = reference
        if self.lora_model is None and reference is None:
            self.reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)

    @property
    def can_validate(self) -> bool:
        return self.reference is not None or self.lora_model is not None

    def _reference_logps(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lora_model is not None:
            with adapters_disabled(self.lora_model):
                return reference_pair_logps(model, batch)
        assert self.reference is not None
        return reference_pair_logps(self.reference, batch)

    def compute(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        if "reference_chosen_logps" not in batch and self.lora_model is not None:
            # ``model`` (the peft model, inside the engine's forward) runs the pass with its adapters off.
            chosen, rejected = self._reference_logps(model, batch)
            batch = {**batch, "reference_chosen_logps": chosen, "reference_rejected_logps": rejected}
        return dpo_batch_loss(model, batch, beta=self.beta, reference_model=self.reference)

    def reference_rows(self, batch: Batch, engine: nn.Module | None = None) -> ReferenceTable:
        """The reference log-probs of ``batch``'s pairs (chosen, rejected), keyed by (source, row).

        ``engine``: the training engine, which a LoRA model's adapters-off pass then goes through (one
        forward of its own, as in training); a full model's reference is a model of its own."""
        model = (engine or self.lora_model) if self.lora_model is not None else self.reference
        chosen, rejected = run_objective(model, self._reference_logps, batch=batch)
        keys = zip(batch["source"], batch["row"].tolist(), strict=True)
        return {key: (c, r) for key, c, r in zip(keys, chosen.tolist(), rejected.tolist(), strict=True)}

    def release_reference(self) -> None:
        """Free the reference model once every pair has its precomputed log-probs (a LoRA model keeps
        its reference: the adapters switch off for free)."""
        self.reference = None

    def precompute_reference(self, batches: Iterable[Batch]) -> ReferenceTable:
        """Reference log-probs of every pair in ``batches`` (one process), keyed by (source, row);
        frees the reference model.  Across ranks: ``pipelines.training.loop.precompute_reference_table``."""
        table: ReferenceTable = {}
        for batch in batches:
            table.update(self.reference_rows(batch))
        self.release_reference()
        return table


class ORPOObjective(Objective):
    """ORPO (Hong et al.): NLL of the chosen response plus β × the odds-ratio term; no reference."""

    response_prefix = "chosen_"

    def __init__(self, cfg: ORPOConfig, model: nn.Module, device: torch.device, *, seed: int, rank: int = 0):
        super().__init__(cfg, model, device, seed=seed, rank=rank)
        self.beta = cfg.beta

    def compute(self, model: nn.Module, batch: Batch, step: int, *, validation: bool = False) -> ObjectiveOutput:
        return orpo_batch_loss(model, batch, beta=self.beta)


OBJECTIVES: dict[type, type[Objective]] = {
    IFTConfig: IFTObjective,
    SFTConfig: SFTObjective,
    DPOConfig: DPOObjective,
    ORPOConfig: ORPOObjective,
}


def build_objective(
    cfg: ORPOConfig,
    model: nn.Module,
    device: torch.device,
    *,
    seed: int,
    rank: int = 0,
    reference: nn.Module | None = None,
) -> Objective:
    """The objective of ``cfg``'s method for ``model``; ``reference`` (the frozen start policy, when the
    caller built it partitioned) goes to methods that train against one and is ignored by the others."""
    extra = {"reference": reference} if cfg.uses_reference else {}
    return OBJECTIVES[type(cfg)](cfg, model, device, seed=seed, rank=rank, **extra)
