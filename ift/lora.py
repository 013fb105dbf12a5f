"""LoRA adapters (Hu et al., 2021) through peft, for every objective.

LoRA freezes the weights W of the target linear layers and trains a low-rank
update: ``W x + (alpha / r) · B A x`` with ``A`` (r × in) random and ``B``
(out × r) zero at the start, so the adapted model starts as the base model.

What the objectives need from it:

* IFT's fusion (paper eq. 17) mixes the *base* input embeddings, which LoRA
  leaves untouched (only linear layers get adapters): ``get_input_embeddings``
  of the peft model is the base model's;
* DPO's reference π_ref (paper eq. 32) is the start policy, which is the same
  model with its adapters switched off (:func:`adapters_disabled`): no second
  copy of the weights;
* the export merges ``W + (alpha / r) B A`` into plain weights
  (:func:`merged_state_dict`), so the saved model is a standard Hugging Face
  model that loads without peft; the adapters are kept too (:func:`save_adapter`).

Pure peft/transformers: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter a model gets here


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> nn.Module:
    """Wrap ``model`` as a peft model with LoRA adapters on ``target_modules``; only the adapters train.

    A target that matches no module is an error naming the model's linear layers, so a typo in
    ``model.lora.target_modules`` does not silently train nothing.
    """
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in target_modules if t not in linear]
    if missing:
        raise ValueError(
            f"model.lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are {linear}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Checkpointed blocks need an input that requires grad; the frozen embeddings give none.
        peft_model.enable_input_require_grads()
    return peft_model


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, the peft ``model`` computes the base model (DPO's reference policy)."""
    with model.disable_adapter():
        yield


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 a partitioned parameter counts its full size (``ds_numel``)."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """Module path (as in the state dict, without the peft prefix) -> alpha / r of its adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.scaling:
            out[name.removeprefix("base_model.model.")] = float(module.scaling[ADAPTER])
    return out


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft ``model``'s full ``state`` (its ``state_dict()``, gathered) with every adapter merged:
    ``W + (alpha / r) · B A`` under the base model's own keys, ready for ``save_pretrained``.

    Computed from the tensors, so the training model is left as it is (nothing merged in place).
    """
    scalings = lora_scalings(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for path, scale in scalings.items():
        a = state[f"base_model.model.{path}.lora_A.{ADAPTER}.weight"]
        b = state[f"base_model.model.{path}.lora_B.{ADAPTER}.weight"]
        out[f"{path}.weight"] = merged_weight(out[f"{path}.weight"], a, b, scale)
    return out


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale · B A`` (LoRA, Hu et al. eq. 3, with scale = alpha / r), computed in float32 and
    returned in ``W``'s dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], out_dir: str) -> None:
    """Write the adapters of the peft ``model`` (taken from its full ``state``, gathered) as peft saves
    them: ``adapter_model.safetensors`` + ``adapter_config.json``, loadable with ``PeftModel.from_pretrained``."""
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
