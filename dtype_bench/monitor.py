"""Per-step training signals without per-step host syncs.

Every optimizer step's loss, grad norm, max |logit|, non-finite counts and scaler skips are kept as device
scalars and written to the step log in one transfer at the next log step. Nothing is filtered: a NaN loss
is logged as NaN. Divergence (non-finite loss for `patience` consecutive steps) is decided at flush time.
Under DDP every rank calls `flush` (the signals are reduced over ranks: mean loss, max |logit|, summed
non-finite counts) and only rank 0 passes a `log`, so all ranks take the same divergence decision.
With a `PrecisionDiagnostics`, each line also carries, per group, how many of its forward outputs, gradients and
updated weights held a non-finite value, and `nonfinite_origin`; measured steps carry its fields
(`update_fidelity`, `lost_update_frac`, `grad_subnormal_frac`, ...).
"""
from __future__ import annotations

import torch

from dtype_bench.diagnostics import PrecisionDiagnostics
from dtype_bench.distributed import reduce_step_signals
from dtype_bench.precision import FP16_MAX
from dtype_bench.results import StepLog


class TrainingMonitor:
    def __init__(self, log: StepLog | None, device: torch.device, scaler: torch.amp.GradScaler, patience: int,
                 diagnostics: PrecisionDiagnostics | None = None):
        self.log, self.device, self.scaler, self.patience = log, device, scaler, patience
        self.diagnostics = diagnostics
        self.diverged_at: int | None = None  # first step of the non-finite streak that stopped the run
        self.first_nonfinite_step: int | None = None
        self.skipped_steps = 0
        self._streak = 0
        self._pending: list[tuple[int, float, torch.Tensor, dict]] = []
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
        values = torch.stack([self._loss, grad_norm, self._max_logit, self._bad_logits, skipped.float()])
        measured = {}
        if self.diagnostics is not None:
            values = torch.cat([values, self.diagnostics.step_counts()])
            measured = self.diagnostics.step_fields()
        self._pending.append((step, lr, values, measured))
        self._reset_micro()

    def flush(self, extra: dict | None = None) -> dict | None:
        """Write pending steps (one host sync). `extra` (e.g. diagnostics) goes on the last line.
        Returns the last record written."""
        if not self._pending:
            return None
        values = torch.stack([v for _, _, v, _ in self._pending])
        # columns: loss, grad norm (equal on all ranks), max |logit|, bad logits, skipped, diagnostics counts
        values = reduce_step_signals(values, mean=[0], maximum=[2], total=[3, *range(5, values.shape[1])]).tolist()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        record = None
        for i, ((step, lr, _, measured), (loss, gnorm, max_logit, bad_logits, skipped, *diag_counts)) in enumerate(
                zip(self._pending, values)):
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
            nonfinite = {"nonfinite": {"loss": int(not finite), "logits": int(bad_logits)}}
            if self.diagnostics is not None:
                nonfinite = self.diagnostics.nonfinite_record(step, diag_counts, nonfinite["nonfinite"],
                                                              scaler_skips=self.scaler.is_enabled())
            record = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "max_abs_logit": max_logit,
                "fp16_max": FP16_MAX, "loss_scale": scale if last else None,
                "skipped_steps": self.skipped_steps,
                **nonfinite,
                **measured,
                **(extra if last and extra else {}),
            }
            if self.log is not None:
                self.log.write(record)
        self._pending.clear()
        return record

    def state_dict(self) -> dict:
        """The counters a resumed run continues from (call right after `flush`)."""
        if self._pending:
            raise RuntimeError("flush the monitor before saving its state")
        return {"skipped_steps": self.skipped_steps, "streak": self._streak,
                "first_nonfinite_step": self.first_nonfinite_step, "diverged_at": self.diverged_at}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps, self._streak = state["skipped_steps"], state["streak"]
        self.first_nonfinite_step, self.diverged_at = state["first_nonfinite_step"], state["diverged_at"]

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None
