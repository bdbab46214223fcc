"""Per-step training signals without per-step host syncs.

Every optimizer step's loss, grad norm, max |logit|, non-finite counts and scaler skips are kept as device
scalars and written to the step log in one transfer at the next log step. Nothing is filtered: a NaN loss
is logged as NaN. Divergence (non-finite loss for `patience` consecutive steps) is decided at flush time.
"""
from __future__ import annotations

import torch

from dtype_bench.precision import FP16_MAX
from dtype_bench.results import StepLog


class TrainingMonitor:
    def __init__(self, log: StepLog, device: torch.device, scaler: torch.amp.GradScaler, patience: int):
        self.log, self.device, self.scaler, self.patience = log, device, scaler, patience
        self.diverged_at: int | None = None  # first step of the non-finite streak that stopped the run
        self.first_nonfinite_step: int | None = None
        self.skipped_steps = 0
        self._streak = 0
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        self._reset_micro()

    def _reset_micro(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._loss, self._max_logit, self._bad_logits = zero.clone(), zero.clone(), zero.clone()

    def micro_batch(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        """After each micro-batch's backward: `loss` is the already accumulation-divided loss."""
        logits = logits.detach()
        self._loss += loss.detach().float()
        self._max_logit = torch.maximum(self._max_logit, logits.abs().amax().float())
        self._bad_logits += (~torch.isfinite(logits)).sum()

    def step(self, step: int, grad_norm: torch.Tensor, lr: float) -> None:
        """After the optimizer step. A scaler skip = non-finite unscaled gradients with scaling on (exactly
        when GradScaler.step skips the update and update() lowers the scale)."""
        grad_norm = grad_norm.detach().float()
        skipped = (~torch.isfinite(grad_norm)) & self.scaler.is_enabled()
        self._pending.append((step, lr, torch.stack([
            self._loss, grad_norm, self._max_logit, self._bad_logits, skipped.float()])))
        self._reset_micro()

    def flush(self, extra: dict | None = None) -> dict | None:
        """Write pending steps (one host sync). `extra` (e.g. diagnostics) goes on the last line.
        Returns the last record written."""
        if not self._pending:
            return None
        values = torch.stack([v for _, _, v in self._pending]).tolist()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        record = None
        for i, ((step, lr, _), (loss, gnorm, max_logit, bad_logits, skipped)) in enumerate(zip(self._pending, values)):
            finite = loss == loss and abs(loss) != float("inf")
            self.skipped_steps += int(skipped)
            if finite:
                self._streak = 0
            else:
                self.first_nonfinite_step = self.first_nonfinite_step or step
                self._streak += 1
                if self._streak >= self.patience and self.diverged_at is None:
                    self.diverged_at = step - self.patience + 1
            last = i == len(self._pending) - 1
            record = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "max_abs_logit": max_logit,
                "fp16_max": FP16_MAX, "loss_scale": scale if last else None,
                "skipped_steps": self.skipped_steps,
                "nonfinite": {"loss": int(not finite), "logits": int(bad_logits)},
                **(extra if last and extra else {}),
            }
            self.log.write(record)
        self._pending.clear()
        return record

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None
