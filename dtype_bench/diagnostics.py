"""Precision diagnostics: why a config wins, stalls or diverges. `PrecisionDiagnostics` hooks a model and its
optimizer and records, per parameter group (a `name -> group` function: e.g. embeddings / encoder / head):

    diag = PrecisionDiagnostics(model, optimizer, group_of, every=cfg.diagnostics_every)
    monitor = TrainingMonitor(log, device, scaler, patience, diagnostics=diag)
    ...                                    # forward / backward / unscale / clip
    diag.before_step()
    scaler.step(optimizer)
    diag.after_step()
    ...                                    # at each evaluation: log diag.weight_drift(); the row: diag.summary()
    ...                                    # checkpoint: diag.state_dict(); resume: diag.load_state_dict(state)

Every optimizer step, no host sync (`nonfinite.py`): how many forward outputs, gradients (unscaled, clipped) and
updated weights hold a non-finite element. The monitor resolves them at its flush into `nonfinite` and
`nonfinite_origin`, the first stage holding one in the order forward (group by group, in module-definition
order) -> loss -> backward -> optimizer update. Gradients that overflow under a GradScaler are not an origin:
the scaler skips that update by design (counted in `skipped_steps`).

Measured steps (step 1 and every `every` steps; `measures(step)`, which run loops leave out of throughput
timing) add:
- `update_fidelity` = <applied, intended> / ||intended||^2: `applied` is what the optimizer changed in the
  weights, `intended` the update an fp32 AdamW with the same hyper-parameters computes from the same gradient and
  (dequantized) state (`adamw_state.py`). 1 = landed as computed in fp32; below 1 = the weight/state write
  rounded part of it away (stochastic rounding is unbiased: ~1). `lost_update_frac`: of the elements with a
  non-zero intended update, the fraction left exactly unchanged.
- `moment_update_lost_frac` {"exp_avg"|"exp_avg_sq": {group: f}}: of the moment elements the fp32 recurrence from
  the stored value would change by more than `RESOLVED_CHANGE` of their magnitude, the fraction whose stored
  value did not move at least half-way there, which `update_fidelity` cannot see: a bf16 second moment with
  beta2 = 0.999 moves at most 0.1% per step, below bf16's half-ulp (0.2%), so it stops decaying (stored
  bit-identical). 8-bit block-wise codes are read dequantized: their block scale lets a block decay together,
  but an element whose change is below the code spacing keeps its code. Absent on step 1.
- `update_weight_ratio_median`: median |intended update| / |weight| over non-zero weights (a strided sample of
  at most `MEDIAN_SAMPLE` elements per group).
- zeros and subnormals (`underflow.underflow_fields`: `<prefix>_zero_in_live_rows_frac`, `_subnormal_frac` and
  `_structural_zero_frac`): prefix `grad` over parameter gradients as
  the optimizer sees them, rows along dim 0, in their own dtype (under autocast the fp32 master gradients, where
  fp16 underflow cannot show); prefix `act_grad`, with `act_grad_dtypes` (the dtype each was judged in), over the
  gradients of the activations entering every matmul layer (nn.Linear, HF Conv1D), rows along the feature
  dimension, with the loss scale applied, judged against the narrower of its own dtype and that of the matmul
  that consumes the activation (under autocast the autocast dtype: an fp32 LayerNorm output feeding an fp16
  matmul gets its gradient from that fp16 matmul). Exact zeros inside live rows are not all flushes (fp32 has a few), and a row that flushed whole
  counts as structural: the analysis corrects both against the fp32 baseline (`act_grad_flushed_frac_vs_fp32`).
  `second_moment_underflow_frac`: of the second-moment elements whose fp32 recurrence (from the stored value and
  the same gradient; from zero on the first step) is a normal fp32 number, the fraction the optimizer stored as
  zero or subnormal in the moment's own dtype: 0 for fp32 moments, and rows that never saw a gradient are left
  out (their recurrence is 0). None for a group holding 8-bit codes (no subnormals; what the codes do to small
  values shows in `moment_update_lost_frac`).
A step the GradScaler skipped records the gradient fields and `optimizer_step_skipped`. Non-finite values are
kept: an update that wrote NaN has NaN fidelity.

Cost of a measured step: one fp32 AdamW step, computed a parameter at a time on its device (transient: about
four fp32 copies of the largest parameter), ~10 elementwise passes and a few host syncs per parameter, and per
parameter in host memory until the update: the weights before it, the fp32 intended update and per moment
its stored value and its fp32 recurrence's value, both in fp32 (N x (weight bytes + 4 + 16) bytes for N
parameters). Keep `every` >= 10 where throughput matters (measured costs: benchmarks/RESULTS.md).
Weight drift keeps one host copy of the initial weights (N x weight bytes), which checkpoints do not store (see
`state_dict`). Nothing extra stays on an accelerator; on CPU these host copies are part of the peak RSS.
`summary()` adds the static memory (`memory.tensor_bytes`) of weights, gradients and optimizer state.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import weakref

import torch
from torch import nn

from dtype_bench.adamw_state import (betas, moments_fp32, next_moments_fp32, second_moment, stored_moments,
                                       stored_moments_fp32)
from dtype_bench.memory import is_8bit, tensor_bytes
from dtype_bench.nonfinite import GroupOf, count_nonfinite, count_nonfinite_state, group_roots, output_tensors
from dtype_bench.optimizers import adamw_fp32_step
from dtype_bench.precision import dtype_name
from dtype_bench.underflow import tiny_or_zero, underflow_counts, underflow_fields


def matmul_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul layer computes in for input `x`: the autocast dtype where autocast is on for x's device,
    else the layer's weight dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return module.weight.dtype

MEDIAN_SAMPLE = 2**20  # elements per group for the update/weight median
RESOLVED_CHANGE = 2.0**-20  # a relative moment change fp32 resolves (~8 ulps) and bf16 (half-ulp 2^-9) cannot


class PrecisionDiagnostics:
    """Per-group update fidelity, underflow, non-finite origin, weight drift and memory accounting.

    `model`: the (uncompiled) module whose parameters the optimizer updates; the non-finite forward hooks are also
    traced into a torch.compile wrapper of it (guard-free: nothing recompiles), the activation-gradient hooks act
    on eager forwards only (`loop.TrainingRun.forward_backward` runs measured steps eagerly). `group_of`: parameter
    name -> group. `every`: measure fidelity and underflow on step 1 and every `every` steps (0: never; the
    per-step non-finite tracking stays on).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, group_of: GroupOf, *, every: int):
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.optimizer, self.every = optimizer, every
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.device = self.named[0][1].device
        self.group_of_param = {p: group_of(n) for n, p in self.named}
        roots = group_roots(model, group_of)
        self.groups = list(dict.fromkeys([g for g, _ in roots] + list(self.group_of_param.values())))
        self._hyper = {p: group for group in optimizer.param_groups for p in group["params"]}
        self._initial = {p: p.detach().to("cpu", copy=True) for _, p in self.named}
        self._params_of = {g: [p for _, p in self.named if self.group_of_param[p] == g] for g in self.groups}
        self._numel = {g: sum(p.numel() for p in self._params_of[g]) for g in self.groups}

        self.step = 0
        self.first_origin: dict | None = None  # {"step", "where"} of the first non-finite value
        self.fidelity_history: dict[str, list[float]] = {g: [] for g in self.groups}
        self.measured_steps = 0
        self._forward_nonfinite = torch.zeros(len(self.groups), device=self.device)  # per group, this step
        self._stepped = False
        self._snapshot: dict | None = None
        self._step_counts: list[torch.Tensor] = []
        self._fields: dict = {}
        self._memory: dict = {}
        for group, module in roots:
            module.register_forward_hook(self._forward_hook(self.groups.index(group)))
        # activation gradients: the inputs of every matmul layer, seen in backward on measured steps
        self._act_counts: dict[str, torch.Tensor] = {}
        self._act_dtypes: dict[str, set[str]] = {}
        self._act_hooked: dict[int, weakref.ref] = {}  # id -> the tensor hooked (ids of freed tensors are reused)
        self._armed = self.measures(1)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and weight in self.group_of_param:
                module.register_forward_pre_hook(self._input_grad_hook(self.group_of_param[weight]))
        optimizer.register_step_post_hook(self._mark_stepped)

    # ---- hooks

    def _forward_hook(self, slot: int):
        # A closure, not a bound method: deepcopy(model) (fp32 evaluation) must not copy this object.
        # Counts are added in place into one device vector: under torch.compile the hook is traced into the graph
        # and reads nothing a guard could see change between steps or micro-batches (a list of counts replaced
        # per call or per step is: its length, or which of its entries are the same tensor, and recompiles).
        def hook(module, args, output):
            if module.training:  # evaluation forwards are not training steps
                self._forward_nonfinite[slot] += count_nonfinite(output_tensors(output), self.device)
        return hook

    def _input_grad_hook(self, group: str):
        # A closure, like _forward_hook. Registers a tensor hook on the layer's input, once per tensor (q/k/v
        # share theirs), on the forwards of a measured step: the gradient it sees is what backward computed for
        # that activation, in its own dtype, with the loss scale applied. Inside torch.compile it does nothing
        # and reads nothing (a compiled graph must not depend on whether a step is measured): the training loop
        # runs a measured step's forward eagerly (`loop.TrainingRun.forward_backward`).
        def pre_hook(module, args):
            if torch.compiler.is_compiling():
                return
            x = args[0] if args else None
            if not (self._armed and module.training and torch.is_grad_enabled() and torch.is_tensor(x)
                    and x.requires_grad):
                return
            hooked = self._act_hooked.get(id(x))
            if hooked is None or hooked() is not x:
                self._act_hooked[id(x)] = weakref.ref(x)
                x.register_hook(functools.partial(self._count_activation_grad, group, matmul_dtype(module, x)))
        return pre_hook

    def _count_activation_grad(self, group: str, dtype: torch.dtype, grad: torch.Tensor) -> None:
        judged = dtype if torch.finfo(dtype).tiny > torch.finfo(grad.dtype).tiny else grad.dtype
        counts = underflow_counts(grad.detach().reshape(-1, grad.shape[-1]), judged)
        self._act_counts[group] = self._act_counts[group] + counts if group in self._act_counts else counts
        self._act_dtypes.setdefault(group, set()).add(dtype_name(judged))

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self._stepped = True  # not called when the GradScaler skips the step

    def measures(self, step: int) -> bool:
        return self.every > 0 and (step - 1) % self.every == 0

    # ---- around the optimizer step

    def before_step(self) -> None:
        """Call right before `scaler.step(optimizer)` / `optimizer.step()`: gradients are final (unscaled,
        clipped) and the optimizer state is the previous step's."""
        self.step += 1
        self._stepped = False
        self._act_hooked.clear()
        forward = list(self._forward_nonfinite.clone())
        self._forward_nonfinite.zero_()
        grads = [count_nonfinite_state((p.grad for p in self._params_of[g] if p.grad is not None), self.device)
                 for g in self.groups]
        self._step_counts = forward + grads
        with_grad = [(n, p) for n, p in self.named if p.grad is not None]
        self._fields = {}
        if not self._memory:
            self._memory["grads"] = self._bytes_by_group({p: tensor_bytes(p.grad) for _, p in with_grad})
        if self.measures(self.step):
            self._snapshot = self._capture(with_grad)

    @torch.no_grad()
    def _capture(self, with_grad: list[tuple[str, torch.nn.Parameter]]) -> dict:
        grad_counts: dict[str, torch.Tensor] = {}
        before, intended, moments, second_reference, ratios = {}, {}, {}, {}, {g: [] for g in self.groups}
        for _, p in with_grad:
            group = self.group_of_param[p]
            grad = p.grad.detach()
            counts = underflow_counts(grad.reshape(grad.shape[0], -1) if grad.ndim >= 2 else grad.reshape(1, -1))
            grad_counts[group] = grad_counts[group] + counts if group in grad_counts else counts
            hyper, state = self._hyper[p], self.optimizer.state.get(p, {})
            moments[p] = self._moment_snapshot(state, grad, hyper)
            second_reference[p] = (moments[p]["exp_avg_sq"][1] if "exp_avg_sq" in moments[p] else
                                   ((1 - betas(hyper)[1]) * grad.float().square()).cpu())
            adam_moments = moments_fp32(state, p, hyper)
            if adam_moments is None:
                continue
            beta1, beta2 = betas(hyper)
            update = adamw_fp32_step(p, grad, *adam_moments[:2], adam_moments[2] + 1, lr=float(hyper["lr"]),
                                     beta1=beta1, beta2=beta2, eps=hyper["eps"],
                                     weight_decay=hyper["weight_decay"])[0] - p.float()
            weight = p.detach().float()
            stride = max(1, self._numel[group] // MEDIAN_SAMPLE)
            ratio = (update.abs() / weight.abs()).flatten()[::stride]
            ratios[group].append(ratio[weight.flatten()[::stride] != 0].cpu())
            before[p], intended[p] = p.detach().to("cpu", copy=True), update.cpu()
        self._fields.update(underflow_fields("grad", grad_counts))
        if self._act_counts:
            self._fields.update(underflow_fields("act_grad", self._act_counts))
            self._fields["act_grad_dtypes"] = {g: sorted(d) for g, d in self._act_dtypes.items()}
        self._act_counts, self._act_dtypes = {}, {}
        medians = {g: torch.cat(r) for g, r in ratios.items() if r}
        self._fields["update_weight_ratio_median"] = {
            g: float(r.median()) if r.numel() else None for g, r in medians.items()}
        return {"before": before, "intended": intended, "moments": moments, "second_reference": second_reference}

    @staticmethod
    def _moment_snapshot(state: dict, grad: torch.Tensor, hyper: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per moment, on the host in fp32: (its stored value before the step (8-bit codes dequantized), the value
        the fp32 recurrence from that stored value gives). Empty before the first step (no state yet)."""
        if not state:
            return {}
        stored = stored_moments_fp32(state, grad)
        return {role: (stored[role].to("cpu", copy=True), target.to("cpu", copy=True))
                for role, target in next_moments_fp32(state, grad, hyper).items()}

    @torch.no_grad()
    def after_step(self) -> None:
        """Call right after `scaler.step(optimizer)` / `optimizer.step()`."""
        self._armed = self.measures(self.step + 1)
        self._step_counts += [count_nonfinite_state(self._params_of[g], self.device) for g in self.groups]
        if self._stepped and "optimizer_state" not in self._memory:
            self._account_optimizer_state()
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        self.measured_steps += 1
        if not self._stepped:
            self._fields["optimizer_step_skipped"] = True
            return
        dot, norm, lost, moving = ({g: 0.0 for g in self.groups} for _ in range(4))
        for p, intended in snapshot["intended"].items():
            group = self.group_of_param[p]
            applied = p.detach().cpu().float() - snapshot["before"][p].float()
            dot[group] += float((applied * intended).sum())
            norm[group] += float(intended.square().sum())
            nonzero = intended != 0
            lost[group] += int((nonzero & (applied == 0)).sum())
            moving[group] += int(nonzero.sum())
        fidelity = {g: dot[g] / norm[g] if norm[g] else None for g in self.groups if moving[g] or norm[g]}
        for g, value in fidelity.items():
            if value is not None:
                self.fidelity_history[g].append(value)
        self._fields["update_fidelity"] = fidelity
        self._fields["lost_update_frac"] = {g: lost[g] / moving[g] for g in self.groups if moving[g]}
        moments_lost = self._moment_update_lost(snapshot["moments"])
        if moments_lost:  # none before the first step allocated moments
            self._fields["moment_update_lost_frac"] = moments_lost
        small, total, coded = {g: 0 for g in self.groups}, {g: 0 for g in self.groups}, set()
        fp32_normal = torch.finfo(torch.float32).tiny
        for p, reference in snapshot["second_reference"].items():
            state, group = self.optimizer.state.get(p, {}), self.group_of_param[p]
            second = second_moment(state)
            if second is not None:
                live = reference.abs() >= fp32_normal  # the fp32 recurrence holds a normal number
                small[group] += int((tiny_or_zero(second).cpu().view_as(live) & live).sum())
                total[group] += int(live.sum())
            elif "exp_avg_sq" in stored_moments(state):
                coded.add(group)  # 8-bit codes
        self._fields["second_moment_underflow_frac"] = {
            g: small[g] / total[g] for g in self.groups if total[g] and g not in coded}

    def _moment_update_lost(self, snapshots: dict) -> dict[str, dict[str, float]]:
        """Per moment and group: of the elements the fp32 recurrence would change by more than `RESOLVED_CHANGE`
        of their magnitude (far below bf16's half-ulp 2^-9, far above fp32's rounding), the fraction whose stored
        value did not move at least half-way to the fp32 value. For floating-point moments rounded to nearest
        that is exactly "stored bit-identical" (a change of more than half an ulp moves the value by at least
        half the change); 8-bit block-wise codes, whose block scale moves every element of a block together,
        lose an element's update when its code stays put while its block's scale moves the other way or less."""
        lost, changing = {}, {}
        for p, roles in snapshots.items():
            stored, group = stored_moments_fp32(self.optimizer.state.get(p, {}), p), self.group_of_param[p]
            for role, (before, target) in roles.items():
                intended, moved = target - before, stored[role].cpu() - before
                changes = intended.abs() > RESOLVED_CHANGE * before.abs()
                short = moved * intended.sign() < 0.5 * intended.abs()
                lost.setdefault(role, {}).setdefault(group, 0)
                changing.setdefault(role, {}).setdefault(group, 0)
                lost[role][group] += int((changes & short).sum())
                changing[role][group] += int(changes.sum())
        fractions = {role: {g: lost[role][g] / n for g, n in groups.items() if n} for role, groups in changing.items()}
        return {role: groups for role, groups in fractions.items() if groups}

    # ---- read by the monitor

    def step_counts(self) -> torch.Tensor:
        """fp32 device vector: how many tensors held a non-finite element this step among the forward outputs,
        the gradients and the updated weights (each per group); resolved by `nonfinite_record` after the
        monitor's single host transfer."""
        return torch.stack(self._step_counts)

    def step_fields(self) -> dict:
        """This step's measured fields (empty on unmeasured steps); host values."""
        fields, self._fields = self._fields, {}
        return fields

    def nonfinite_record(self, step: int, counts: list[float], monitored: dict, *, scaler_skips: bool) -> dict:
        """Step-log fields `nonfinite` (the monitor's loss flag and non-finite logit count, plus per group the
        number of tensors holding a non-finite element: `outputs` (forward outputs, each micro-batch's counted),
        `grads`, `weights` (after the update)) and `nonfinite_origin`: where this step's first non-finite value
        appeared ("forward:<group>", "loss", "backward:<group>", "optimizer:<group>") or None.
        Remembers the run's first origin.

        `scaler_skips`: with loss scaling, non-finite gradients are expected and their update is skipped, so
        they are not an origin."""
        n = len(self.groups)
        outputs, grads, weights = (dict(zip(self.groups, map(int, counts[i * n:(i + 1) * n]))) for i in range(3))
        candidates = [f"forward:{g}" for g in self.groups if outputs[g]]
        candidates += ["loss"] if monitored["loss"] else []
        candidates += [] if scaler_skips else [f"backward:{g}" for g in self.groups if grads[g]]
        candidates += [f"optimizer:{g}" for g in self.groups if weights[g]]
        origin = candidates[0] if candidates else None
        if origin and self.first_origin is None:
            self.first_origin = {"step": step, "where": origin}
        return {"nonfinite": {**monitored, "outputs": outputs, "grads": grads, "weights": weights},
                "nonfinite_origin": origin}

    # ---- at evaluation and at the end

    @torch.no_grad()
    def weight_drift(self) -> dict[str, float]:
        """||w_t - w_0|| / ||w_0|| per group (computed in fp32 on the host copy)."""
        diff, ref = {g: 0.0 for g in self.groups}, {g: 0.0 for g in self.groups}
        for _, p in self.named:
            w0 = self._initial[p].float()
            diff[self.group_of_param[p]] += float((p.detach().cpu().float() - w0).square().sum())
            ref[self.group_of_param[p]] += float(w0.square().sum())
        return {g: math.sqrt(diff[g] / ref[g]) if ref[g] else None for g in self.groups}

    def _bytes_by_group(self, sizes: dict) -> dict:
        out = {g: sum(b for p, b in sizes.items() if self.group_of_param[p] == g) for g in self.groups}
        return {**out, "total": sum(out.values())}

    def _account_optimizer_state(self) -> None:
        state = {p: self.optimizer.state.get(p, {}) for _, p in self.named}
        self._memory["optimizer_state"] = self._bytes_by_group(
            {p: sum(tensor_bytes(v) for v in s.values() if torch.is_tensor(v)) for p, s in state.items()})
        self._memory["optimizer_8bit_params"] = {
            g: [n for n, p in self.named if self.group_of_param[p] == g
                and any(torch.is_tensor(v) and is_8bit(v) for v in state[p].values())] for g in self.groups}

    def summary(self) -> dict:
        """Results-row fields: first non-finite origin, mean fidelity per group, static memory."""
        origin = self.first_origin or {}
        return {
            "nonfinite_origin": origin.get("where"),
            "nonfinite_origin_step": origin.get("step"),
            "mean_update_fidelity": {g: sum(v) / len(v) if v else None for g, v in self.fidelity_history.items()},
            "diagnostics_measured_steps": self.measured_steps,
            "static_memory_bytes": {"weights": self._bytes_by_group({p: tensor_bytes(p) for _, p in self.named}),
                                    **{k: v for k, v in self._memory.items() if k != "optimizer_8bit_params"}},
            "optimizer_8bit_params": self._memory.get("optimizer_8bit_params"),
        }

    # ---- across a resume

    def state_dict(self) -> dict:
        """What a resumed run needs to report the same `summary()` and `weight_drift()` as an uninterrupted
        one, as plain values (torch.load(weights_only=True)- and JSON-safe). Take it after the monitor's flush:
        the first non-finite origin is resolved there.

        The initial weights are not in it (that would add N x weight bytes to every checkpoint): the resumed
        process builds the model from the same seed and constructs this object on it before restoring the
        checkpoint, so it holds the same initial weights; `initial_weights` (a digest of them) makes
        `load_state_dict` refuse otherwise."""
        return copy.deepcopy({
            "groups": self.groups, "step": self.step, "first_origin": self.first_origin,
            "fidelity_history": self.fidelity_history, "measured_steps": self.measured_steps,
            "memory": self._memory, "initial_weights": self._initial_digest})

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: measured steps stay on the same optimizer steps, and the summary and
        weight drift cover the steps before the resume too."""
        if state["groups"] != self.groups:
            raise ValueError(f"diagnostics state has groups {state['groups']}, this model {self.groups}")
        if state["initial_weights"] != self._initial_digest:
            raise ValueError("diagnostics state was taken from other initial weights: construct "
                             "PrecisionDiagnostics on the freshly initialised model, before restoring the checkpoint")
        state = copy.deepcopy(state)
        self.step, self.first_origin = state["step"], state["first_origin"]
        self.fidelity_history, self.measured_steps = state["fidelity_history"], state["measured_steps"]
        self._memory = state["memory"]
        self._armed = self.measures(self.step + 1)

    @functools.cached_property
    def _initial_digest(self) -> str:
        # computed at the first save or load, not in __init__: a run that never checkpoints does not pay for it
        digest = hashlib.blake2b(digest_size=16)
        for weight in self._initial.values():
            digest.update(weight.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()
