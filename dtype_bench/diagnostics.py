"""Precision diagnostics: why a config wins, stalls or diverges.

One component, model-agnostic (parameters are grouped by a `name -> group` function, e.g. embeddings /
encoder / head), used by a training loop in a few lines:

    diag = PrecisionDiagnostics(model, optimizer, group_of, every=cfg.diagnostics_every)
    monitor = TrainingMonitor(log, device, scaler, patience, diagnostics=diag)
    ...                                    # forward / backward / unscale / clip
    diag.before_step()
    scaler.step(optimizer)
    diag.after_step()
    ...                                    # at each evaluation: log diag.weight_drift(); the row: diag.summary()

Every optimizer step (cheap, no host sync): non-finite counts of each group's forward output (forward hooks on
the outermost modules whose parameters all belong to one group), of each group's gradients (as the optimizer
sees them: unscaled, clipped) and of each group's weights after the update. The monitor resolves them at its
flush into `nonfinite` counts and `nonfinite_origin`: the first stage of the step, in the order forward
(group by group, in module-definition order, which is execution order for these models) -> loss -> backward
-> optimizer update, holding a non-finite value. Gradients that overflow under a GradScaler are not an origin:
the scaler skips that update by design (counted in `skipped_steps`).

Every `every` optimizer steps (the first included), measured steps add per group:
- `update_fidelity` = <applied, intended> / ||intended||^2, where `applied` is what the optimizer actually
  changed in the weights and `intended` is the update an fp32 AdamW with the same hyper-parameters computes
  from the same gradient and the same (dequantized) optimizer state. 1 = the update landed as computed in
  fp32; below 1 = rounding of the weight/state write lost part of it (stochastic rounding is unbiased: ~1).
- `lost_update_frac`: of the elements with a non-zero intended update, the fraction left exactly unchanged.
- `update_weight_ratio_median`: median |intended update| / |weight| over elements with a non-zero weight
  (a strided sample of at most 2^20 elements per group).
- `grad_underflow_frac`: fraction of gradient elements that are zero or subnormal in their own dtype.
- `second_moment_underflow_frac`: the same for the optimizer's second-moment state after the update
  (floating-point states only; 8-bit codes have no subnormals).
A step the GradScaler skipped has no update to compare: it records the gradient fields and
`optimizer_step_skipped`. Non-finite values are kept: an update that wrote NaN has NaN fidelity.

Cost of a measured step: the fp32 shadow AdamW step is computed one parameter at a time on the parameter's
device (transient: about four fp32 copies of the largest parameter), and two tensors per parameter are kept in
host memory until the update has happened: the weights before it (their own dtype) and the fp32 intended
update, i.e. N x (weight bytes + 4) bytes of host memory for N parameters, plus the device<->host copies. In
time it is one fp32 AdamW step plus ~10 elementwise passes over the weights and a few host syncs per parameter.
Measured on a 2-core CPU shared with other jobs (load ~9, so only the order of magnitude holds), tiny preset
fp32 model (6M parameters): AdamW step 0.64 s, per-step non-finite tracking 0.45 s, a measured step ~15 s in
all (about 24 AdamW steps): keep `every` >= 10 where throughput matters.
Run loops exclude measured steps from throughput timing (`measures(step)`). Weight drift keeps one host copy
of the initial weights (N x weight bytes). Nothing extra stays on an accelerator, so its peak memory stays the
training loop's own; on CPU these host copies are part of the process's peak RSS.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn

from dtype_bench.precision import adamw_fp32_step

GroupOf = Callable[[str], str]

MEDIAN_SAMPLE = 2**20  # elements per group for the update/weight median
BNB_BLOCK_SIZE = 256  # bitsandbytes' 8-bit optimizers quantize their states in blocks of 256


# ---------------------------------------------------------------- the fp32 shadow optimizer's inputs


def _dequantize(state: dict, which: int, like: torch.Tensor) -> torch.Tensor:
    """bitsandbytes state{1,2}: fp32 as is, or 8-bit block-wise codes with their absmax and code map."""
    codes = state[f"state{which}"]
    if codes.dtype != torch.uint8:
        return codes.float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(codes, absmax=state[f"absmax{which}"], code=state[f"qmap{which}"],
                                     blocksize=BNB_BLOCK_SIZE).float().view_as(like)


def moments_fp32(state: dict, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(first moment, second moment, steps taken) of an AdamW state in fp32; zeros before the first step;
    None for a state layout this module does not know (that parameter is then left out of the fidelity)."""
    if not state:
        zeros = torch.zeros_like(param, dtype=torch.float32)
        return zeros, zeros, 0.0
    steps = float(state["step"])
    if "exp_avg" in state:  # torch.optim.AdamW, torchao AdamW (its quantized states dequantize on .float())
        return state["exp_avg"].float(), state["exp_avg_sq"].float(), steps
    if "state1" in state:  # bitsandbytes
        return _dequantize(state, 1, param), _dequantize(state, 2, param), steps
    return None


def _second_moment(state: dict) -> torch.Tensor | None:
    value = state.get("exp_avg_sq", state.get("state2"))
    return value if torch.is_tensor(value) and value.is_floating_point() else None


# ---------------------------------------------------------------- small tensor helpers


def tiny_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Elements that are zero or subnormal in the tensor's own dtype (NaN counts as neither)."""
    return t.abs() < torch.finfo(t.dtype).tiny


def nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """Non-finite elements, on the device. t - t is NaN exactly where t is inf or NaN; counting its non-zeros
    is ~3x faster on CPU than summing the boolean `~isfinite(t)`."""
    return torch.count_nonzero(t - t)


def _count_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    counts = [nonfinite_count(t) for t in tensors]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long, device=device)


def _output_tensors(output) -> Iterator[torch.Tensor]:
    """Floating tensors in a module output (tensor, tuple/list, dict or HF ModelOutput)."""
    if torch.is_tensor(output):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _output_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _output_tensors(item)


def _stored_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a subclass's inner tensors (torchao's quantized
    optimizer states keep codes and scales inside)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _stored_tensors(getattr(t, name))
    else:
        yield t


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes actually allocated for a tensor, so 8-bit states show their real size."""
    return sum(x.numel() * x.element_size() for x in _stored_tensors(t))


def _is_8bit(t: torch.Tensor) -> bool:
    return any(x.dtype in (torch.uint8, torch.int8) for x in _stored_tensors(t))


def group_roots(model: nn.Module, group_of: GroupOf) -> list[tuple[str, nn.Module]]:
    """The outermost called modules whose parameters all belong to one group, in definition order, as
    (group, module). Their outputs are where a group's forward pass ends. Containers that are never called
    (ModuleList/ModuleDict, e.g. a stack of transformer blocks) contribute their children instead."""
    roots: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        groups = {group_of(f"{prefix}{n}") for n, _ in module.named_parameters(remove_duplicate=False)}
        if len(groups) == 1 and prefix and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            roots.append((groups.pop(), module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return roots


# ---------------------------------------------------------------- the component


class PrecisionDiagnostics:
    """Per-group update fidelity, underflow, non-finite origin, weight drift and memory accounting.

    `model`: the (uncompiled) module whose parameters the optimizer updates; hooks also fire under a
    torch.compile wrapper of it. `group_of`: parameter name -> group. `every`: measure fidelity and underflow
    on step 1 and every `every` steps (0: never; the per-step non-finite tracking stays on).
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
        self._numel = {g: sum(p.numel() for p, pg in self.group_of_param.items() if pg == g) for g in self.groups}

        self.step = 0
        self.first_origin: dict | None = None  # {"step", "where"} of the first non-finite value
        self.fidelity_history: dict[str, list[float]] = {g: [] for g in self.groups}
        self.measured_steps = 0
        self._forward_counts: list[tuple[int, torch.Tensor]] = []
        self._stepped = False
        self._snapshot: dict | None = None
        self._step_counts: list[torch.Tensor] = []
        self._fields: dict = {}
        self._memory: dict = {}
        for group, module in roots:
            module.register_forward_hook(self._forward_hook(self.groups.index(group)))
        optimizer.register_step_post_hook(self._mark_stepped)

    # ---- hooks

    def _forward_hook(self, slot: int):
        # A closure, not a bound method: deepcopy(model) (fp32 evaluation) must not copy this object.
        def hook(module, args, output):
            if module.training:  # evaluation forwards are not training steps
                self._forward_counts.append((slot, _count_nonfinite(list(_output_tensors(output)), self.device)))
        return hook

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self._stepped = True  # not called when the GradScaler skips the step

    def _by_group(self, values: dict[torch.nn.Parameter, torch.Tensor]) -> list[torch.Tensor]:
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        return [sum((v for p, v in values.items() if self.group_of_param[p] == g), zero) for g in self.groups]

    def measures(self, step: int) -> bool:
        return self.every > 0 and (step - 1) % self.every == 0

    # ---- around the optimizer step

    def before_step(self) -> None:
        """Call right before `scaler.step(optimizer)` / `optimizer.step()`: gradients are final (unscaled,
        clipped) and the optimizer state is the previous step's."""
        self.step += 1
        self._stepped = False
        forward = [torch.zeros((), dtype=torch.long, device=self.device) for _ in self.groups]
        for slot, count in self._forward_counts:
            forward[slot] = forward[slot] + count
        self._forward_counts.clear()
        with_grad = [(n, p) for n, p in self.named if p.grad is not None]
        grads = self._by_group({p: nonfinite_count(p.grad) for _, p in with_grad})
        self._step_counts = forward + grads
        self._fields = {}
        if not self._memory:
            self._memory["grads"] = self._bytes_by_group({p: tensor_bytes(p.grad) for _, p in with_grad})
        if self.measures(self.step):
            self._snapshot = self._capture(with_grad)

    @torch.no_grad()
    def _capture(self, with_grad: list[tuple[str, torch.nn.Parameter]]) -> dict:
        small, total = {g: 0 for g in self.groups}, {g: 0 for g in self.groups}
        before, intended, ratios = {}, {}, {g: [] for g in self.groups}
        for _, p in with_grad:
            group = self.group_of_param[p]
            small[group] += int(tiny_or_zero(p.grad).sum())
            total[group] += p.grad.numel()
            moments = moments_fp32(self.optimizer.state.get(p, {}), p)
            if moments is None:
                continue
            hyper = self._hyper[p]
            beta1, beta2 = hyper["betas"]
            update = adamw_fp32_step(p, p.grad, *moments[:2], moments[2] + 1, lr=float(hyper["lr"]), beta1=beta1,
                                     beta2=beta2, eps=hyper["eps"], weight_decay=hyper["weight_decay"])[0] - p.float()
            weight = p.detach().float()
            stride = max(1, self._numel[group] // MEDIAN_SAMPLE)
            ratio = (update.abs() / weight.abs()).flatten()[::stride]
            ratios[group].append(ratio[weight.flatten()[::stride] != 0].cpu())
            before[p], intended[p] = p.detach().to("cpu", copy=True), update.cpu()
        self._fields["grad_underflow_frac"] = {g: small[g] / total[g] for g in self.groups if total[g]}
        medians = {g: torch.cat(r) for g, r in ratios.items() if r}
        self._fields["update_weight_ratio_median"] = {
            g: float(r.median()) if r.numel() else None for g, r in medians.items()}
        return {"before": before, "intended": intended}

    @torch.no_grad()
    def after_step(self) -> None:
        """Call right after `scaler.step(optimizer)` / `optimizer.step()`."""
        self._step_counts += self._by_group({p: nonfinite_count(p) for _, p in self.named})
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
        small, total = {g: 0 for g in self.groups}, {g: 0 for g in self.groups}
        for _, p in self.named:
            second = _second_moment(self.optimizer.state.get(p, {}))
            if second is not None:
                small[self.group_of_param[p]] += int(tiny_or_zero(second).sum())
                total[self.group_of_param[p]] += second.numel()
        self._fields["second_moment_underflow_frac"] = {g: small[g] / total[g] for g in self.groups if total[g]}

    # ---- read by the monitor

    def step_counts(self) -> torch.Tensor:
        """Device vector of this step's non-finite counts: forward outputs, gradients, updated weights (each
        per group); resolved by `nonfinite_record` after the monitor's single host transfer."""
        return torch.stack(self._step_counts).float()

    def step_fields(self) -> dict:
        """This step's measured fields (empty on unmeasured steps); host values."""
        fields, self._fields = self._fields, {}
        return fields

    def nonfinite_record(self, step: int, counts: list[float], monitored: dict, *, scaler_skips: bool) -> dict:
        """Step-log fields `nonfinite` (the monitor's loss/logits counts plus per-group counts of forward
        outputs, gradients and updated weights) and `nonfinite_origin`: where this step's first non-finite
        value appeared ("forward:<group>", "loss", "backward:<group>", "optimizer:<group>") or None.
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
                and any(torch.is_tensor(v) and _is_8bit(v) for v in state[p].values())] for g in self.groups}

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
