"""Optimisation: how a training step updates the weights, as the original's ``DRTrainer`` (STAR) and
``adore/train.py`` did.

* :class:`Lamb` — the original's Lamb (lamb.py): no bias correction, L2 decay inside the trust ratio, ‖w‖
  clamped to 10.  :func:`param_groups` / :func:`build_optimizer` / :func:`linear_schedule` reproduce the
  original ``DRTrainer.create_optimizer_and_scheduler``.
* Mixed precision: :func:`autocast_context` / :func:`fp32_context` for the forward pass, :func:`make_grad_scaler`,
  and :func:`optimizer_step` (unscale → clip → step → scaler update → scheduler step → zero grads).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from infra.io import InputError

NO_DECAY_PATTERNS = ("bias", "LayerNorm.weight")
OPTIMIZERS = ("lamb", "adamw")


class Lamb(torch.optim.Optimizer):
    """The original STAR Lamb optimizer (the original repository's lamb.py).  Per parameter ``p`` with gradient ``g``::

        m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²          (no bias correction)
        u ← m / (√v + eps)  [+ weight_decay·p]                 (L2 decay inside the trust ratio)
        r ← clamp(‖p‖, 0, 10) / ‖u‖   (1 if either norm is 0; 1 when adam=True)
        p ← p − lr · r · u

    ``state[p]`` keeps ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and, like the original, the last
    ``weight_norm``, ``adam_norm`` and ``trust_ratio`` (before ``adam`` forces 1).  Computed without host
    synchronisation (the trust ratios stay tensors).

    ``foreach=True`` (the default) updates each group's parameters of one device and dtype together with
    ``torch._foreach_*`` (multi-tensor) operations, a few kernels per group instead of ~15 per parameter: the same
    operations in the same order as ``foreach=False`` (one parameter at a time, the reference), so on the CPU the
    weights are bitwise equal (``tests/test_train_utils.py``); on a GPU the norms' reduction order may differ in
    the last bits.  The temporaries (√v + eps, then u) are made ``chunk_numel`` elements at a time at most
    (2²⁶ float32 = 256 MB each).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, adam: bool = False, foreach: bool = True,
                 chunk_numel: int = 1 << 26):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if chunk_numel < 1:
            raise ValueError(f"invalid chunk_numel {chunk_numel}")
        self.adam = adam
        self.foreach = foreach
        self.chunk_numel = chunk_numel
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            if not self.foreach:
                for p in params:
                    self._update(p, p.grad, *hyper)
                continue
            for chunk in self._chunks(params):
                self._update_many(chunk, *hyper)
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def _update(self, p: torch.Tensor, grad: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
        """One parameter (``foreach=False``): the reference the multi-tensor path reproduces."""
        state = self._state(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        weight_norm = p.detach().float().norm().clamp(0.0, 10.0)
        adam_step = exp_avg / exp_avg_sq.sqrt().add(eps)
        if weight_decay != 0:
            adam_step.add_(p, alpha=weight_decay)
        adam_norm = adam_step.float().norm()
        trust_ratio = self._trust_ratio(weight_norm, adam_norm)
        state["weight_norm"], state["adam_norm"], state["trust_ratio"] = weight_norm, adam_norm, trust_ratio
        if self.adam:
            trust_ratio = torch.ones_like(trust_ratio)
        p.sub_(adam_step * (lr * trust_ratio).to(adam_step.dtype))

    def _chunks(self, params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """``params`` split by device and dtype (in order of first appearance), then into runs of at most
        ``chunk_numel`` elements (a larger parameter alone)."""
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for same in by_kind.values():
            chunk, numel = [], 0
            for p in same:
                if chunk and numel + p.numel() > self.chunk_numel:
                    yield chunk
                    chunk, numel = [], 0
                chunk.append(p)
                numel += p.numel()
            yield chunk

    def _update_many(self, params: list[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
        """Parameters of one device and dtype (``foreach=True``): :meth:`_update`'s operations, multi-tensor."""
        states = [self._state(p) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        weight_norms = torch.stack(torch._foreach_norm([p.detach().float() for p in params])).clamp(0.0, 10.0)
        adam_steps = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(adam_steps, eps)
        adam_steps = torch._foreach_div(exp_avgs, adam_steps)
        if weight_decay != 0:
            torch._foreach_add_(adam_steps, params, alpha=weight_decay)
        adam_norms = torch.stack(torch._foreach_norm([u.float() for u in adam_steps]))
        trust_ratios = self._trust_ratio(weight_norms, adam_norms)
        for state, w, a, r in zip(states, weight_norms.unbind(), adam_norms.unbind(), trust_ratios.unbind()):
            state["weight_norm"], state["adam_norm"], state["trust_ratio"] = w, a, r
        if self.adam:
            trust_ratios = torch.ones_like(trust_ratios)
        torch._foreach_mul_(adam_steps, (lr * trust_ratios).to(adam_steps[0].dtype).unbind())
        torch._foreach_sub_(params, adam_steps)

    @staticmethod
    def _trust_ratio(weight_norm: torch.Tensor, adam_norm: torch.Tensor) -> torch.Tensor:
        """``weight_norm / adam_norm`` elementwise, 1 where either is 0."""
        both_nonzero = (weight_norm > 0) & (adam_norm > 0)
        return torch.where(both_nonzero, weight_norm / torch.where(both_nonzero, adam_norm, 1.0), 1.0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups, as the original ``DRTrainer``: parameters whose name contains ``bias`` or
    ``LayerNorm.weight`` get weight decay 0, all others ``weight_decay``.

    Faithful quirk: the head's ``norm.weight`` does not contain ``LayerNorm.weight`` and IS decayed
    (transformers 5 still names RoBERTa/BERT layer norms ``LayerNorm``).  Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(pattern in name for pattern in NO_DECAY_PATTERNS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """``"lamb"`` → :class:`Lamb` (the original passed only lr and eps; its default betas equal ours) or
    ``"adamw"`` → ``torch.optim.AdamW`` (decoupled decay; replaces the removed ``transformers.AdamW``)."""
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up then linear decay to 0 (HF ``get_linear_schedule_with_warmup``)::

        factor(s) = s / max(1, warmup)                                 for s < warmup
                  = max(0, (total − s) / max(1, total − warmup))       otherwise

    The factor is a closure, so a checkpoint restores the step count but not the horizon: resuming with
    another ``total_steps`` re-targets the decay.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def autocast_context(device: torch.device, fp16: bool = False, bf16: bool = False) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in float16 / bfloat16 on ``device``'s type, or a no-op when neither is asked."""
    if fp16 and bf16:
        raise InputError("choose one of --fp16 and --bf16")
    if not (fp16 or bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if fp16 else torch.bfloat16)


def fp32_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled: scores and losses are computed in float32 (the original's ``autocast(enabled=False)``)."""
    return torch.autocast(device_type=device.type, enabled=False)


def make_grad_scaler(device: torch.device, fp16: bool) -> torch.amp.GradScaler:
    """A GradScaler for fp16 training (disabled — a pass-through — otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=fp16)


def optimizer_step(parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: torch.amp.GradScaler, max_grad_norm: float) -> torch.Tensor:
    """Unscale (fp16), clip the global gradient norm to ``max_grad_norm`` (skipped if ≤ 0), step the optimizer
    through the scaler, update the scale, step the schedule (not when fp16 skipped a step on inf/NaN, like the
    HF Trainer), zero the gradients.  Returns the gradient norm before clipping (a tensor; nan if not clipped).

    No host synchronisation but the GradScaler's own (fp16 only: it reads whether the gradients hold inf/NaN to
    skip the step); whether the optimizer stepped is seen by a step hook, not by reading the scale back."""
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        grad_norm = torch.tensor(float("nan"))
    stepped = []
    hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        scaler.step(optimizer)
    finally:
        hook.remove()
    scaler.update()
    if scheduler is not None and stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
