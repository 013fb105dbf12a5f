"""Every forward pass of a micro-batch inside one root forward, for DeepSpeed ZeRO-3.

ZeRO-3 records the order in which a step uses the model's modules (from one call of the engine's
root module to the next) and, while that order repeats, prefetches each module's parameters from
the other ranks before they are needed.  IFT makes two passes per micro-batch (a no-grad pass for
the model's own predictions, then the pass with gradients on the fused embeddings, computed outside
the model), so two calls of the engine split each step into two different segments: the recorded
order never repeats, is thrown away every step, and every module's parameters are fetched when
needed, synchronously.  :class:`ObjectiveForward` gives the engine one root module whose forward
runs a whole model-level objective (:func:`ift.objectives.ift_loss`, or any other) on the causal
LM it holds, so each micro-batch is one root forward, as SFT's is::

    engine, *_ = deepspeed.initialize(model=ObjectiveForward(model), ...)
    out = run_objective(engine, ift_loss, input_ids=ids, attention_mask=mask, labels=labels, lam=0.2)
    engine.backward(out.loss)

Without DeepSpeed (or under ZeRO 0-2) the wrapper changes nothing: the objective's value and
gradients are those of ``ift_loss(model, ...)``.  The losses, the metrics and their gradients
leave the forward as plain tensors in a tuple, where DeepSpeed's output hooks see them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ift.objectives import ObjectiveOutput

__all__ = ["ObjectiveForward", "run_objective", "unwrap"]


class ObjectiveForward(nn.Module):
    """The causal LM ``model`` (a submodule: its parameters are ``model.*``) and a forward that runs
    ``objective(model, **kwargs)``, every pass of it, as one call of this module.

    ``forward(objective=fn, **kwargs)`` returns ``fn``'s result, an :class:`ObjectiveOutput` as the
    tuple ``(loss, metrics)`` (:func:`run_objective` turns it back); ``forward(*args, **kwargs)``
    without ``objective`` is a plain call of ``model``.  The model's ``config`` stays visible
    (bucket sizes and attention choices are read from it) and ``get_input_embeddings`` passes through.
    ``load_state_dict`` also takes the model's own state dict (keys without ``model.``: a checkpoint
    saved from an engine around the bare model).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self._register_load_state_dict_pre_hook(_prefix_bare_keys, with_module=True)

    def forward(self, *args: Any, objective: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        if objective is None:
            return self.model(*args, **kwargs)
        out = objective(self.model, *args, **kwargs)
        if isinstance(out, ObjectiveOutput):
            return out.loss, out.metrics
        return out

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()


def _prefix_bare_keys(module: ObjectiveForward, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before ``module`` loads a state dict: if none of its keys is the wrapper's, they are the bare
    model's, and get the ``model.`` prefix (in place).  (A Hugging Face model has a ``model`` of its
    own, so the prefix alone does not tell.)"""
    keys = [k for k in state_dict if k.startswith(prefix)]
    wrapped = {f"{prefix}model.{k}" for k in module.model.state_dict(keep_vars=True)}
    if any(k in wrapped for k in keys):
        return
    for key in keys:
        state_dict[f"{prefix}model.{key.removeprefix(prefix)}"] = state_dict.pop(key)


def _root(model: nn.Module) -> ObjectiveForward | None:
    """The :class:`ObjectiveForward` that ``model`` is or wraps (a DeepSpeed engine's ``module``)."""
    if isinstance(model, ObjectiveForward):
        return model
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, ObjectiveForward) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside an :class:`ObjectiveForward` (or an engine wrapping one); else ``model``."""
    root = _root(model)
    return root.model if root is not None else model


def run_objective(model: nn.Module, objective: Callable[..., Any], /, **kwargs: Any) -> Any:
    """``objective(lm, **kwargs)`` with every pass it makes inside one forward of ``model``, when
    ``model`` is an :class:`ObjectiveForward` or a DeepSpeed engine wrapping one (``lm`` is then the
    wrapped causal LM); otherwise simply ``objective(model, **kwargs)``.

    Arguments go by keyword only: DeepSpeed's module hooks rewrite the tensors of positional
    arguments in place (a batch dict would have its tensors replaced).  An objective that returns an
    :class:`ObjectiveOutput` gets one back, built from the tensors the engine returned (DeepSpeed
    hooks its backward on those).
    """
    if _root(model) is None:
        return objective(model, **kwargs)
    returned_output = False

    def call(lm: nn.Module, **kw: Any) -> Any:
        nonlocal returned_output
        out = objective(lm, **kw)
        returned_output = isinstance(out, ObjectiveOutput)
        return out

    result = model(objective=call, **kwargs)
    if returned_output:
        loss, metrics = result
        return ObjectiveOutput(loss, metrics)
    return result
