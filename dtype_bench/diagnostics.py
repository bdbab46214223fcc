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
    ...                                    # checkpoint: diag.state_dict(); resume: diag.load_state_dict(state)

Every optimizer step (no host sync): per group, how many tensors hold a non-finite element among its forward
outputs (forward hooks on the outermost modules whose parameters all belong to one group), its gradients (as
the optimizer sees them: unscaled, clipped) and its weights after the update. Each tensor is reduced to its min
and max (`extremes`): one read, exact, and unlike a sum or a norm it cannot overflow into a false alarm. The
monitor resolves them at its flush into `nonfinite` (those per-group tensor counts) and `nonfinite_origin`: the
first stage of the step, in the order forward (group by group, in module-definition order, which is execution
order for these models) -> loss -> backward -> optimizer update, holding a non-finite value. Gradients that
overflow under a GradScaler are not an origin: the scaler skips that update by design (counted in
`skipped_steps`).

Every `every` optimizer steps (the first included), measured steps add per group:
- `update_fidelity` = <applied, intended> / ||intended||^2, where `applied` is what the optimizer actually
  changed in the weights and `intended` is the update an fp32 AdamW with the same hyper-parameters computes
  from the same gradient and the same (dequantized) optimizer state. 1 = the update landed as computed in
  fp32; below 1 = rounding of the weight/state write lost part of it (stochastic rounding is unbiased: ~1).
- `lost_update_frac`: of the elements with a non-zero intended update, the fraction left exactly unchanged.
- `moment_update_lost_frac` = {"exp_avg": {group: f}, "exp_avg_sq": {group: f}}: of the moment elements that the
  fp32 recurrence from the same stored value (in the optimizer's own convention) would change by more than
  2^-20 of their magnitude, the fraction whose stored value is bit-identical after the step. The moment
  counterpart of `lost_update_frac`, and what `update_fidelity` cannot see (its intended update starts from the
  stored moments): a bf16 second moment rounded to nearest with beta2 = 0.999 moves at most 0.1% per step, below
  bf16's half-ulp (0.2%), so once gradients shrink it stops decaying. 0 for fp32 moments; floating-point moments
  only (8-bit codes are left out); absent on step 1 (no state before it).
- `update_weight_ratio_median`: median |intended update| / |weight| over elements with a non-zero weight
  (a strided sample of at most 2^20 elements per group).
- `grad_zero_frac`, `grad_subnormal_frac` (and their sum `grad_underflow_frac`): parameter-gradient elements that
  are exactly zero / subnormal in their own dtype, as the optimizer sees them (unscaled, clipped), over the
  elements of rows that are not structurally zero; `grad_structural_zero_frac`: elements in all-zero rows (dim 0:
  embedding rows of tokens absent from the batch, positions past the padded length, units nothing reached), over
  all elements. Structural zeros are never counted as underflow. Under autocast these are fp32 master gradients,
  where fp16 underflow cannot show: that is what the next fields are for.
- `act_grad_zero_frac` (flushed to zero), `act_grad_subnormal_frac`, `act_grad_underflow_frac` (below the smallest
  normal: their sum) and `act_grad_structural_zero_frac`, per group, and `act_grad_dtypes`: the same counts over
  the gradients of the activations entering every matmul layer (nn.Linear, HF Conv1D) on a measured step's
  backward, rows along the last (feature) dimension, in the gradient's own dtype and with the loss scale applied
  (what the hardware computed). Under fp16 autocast the inputs of the layers that follow attention and the FFN
  activation are fp16, and their gradients are fp16 matmul outputs: this is where loss scaling matters. A row
  that flushed to zero entirely is counted as structural (the count is a lower bound).
- `second_moment_underflow_frac`: zero or subnormal elements of the optimizer's second-moment state after the update
  (floating-point states only; 8-bit codes have no subnormals).
A step the GradScaler skipped has no update to compare: it records the gradient fields and
`optimizer_step_skipped`. Non-finite values are kept: an update that wrote NaN has NaN fidelity.

Cost of a measured step: the fp32 shadow AdamW step is computed one parameter at a time on the parameter's
device (transient: about four fp32 copies of the largest parameter), and tensors per parameter are kept in
host memory until the update has happened: the weights before it (their own dtype), the fp32 intended update,
and per floating-point moment its stored value and a boolean mask, i.e. N x (weight bytes + 4 + 2 x (moment
bytes + 1)) bytes of host memory for N parameters, plus the device<->host copies. In
time it is one fp32 AdamW step plus ~10 elementwise passes over the weights and a few host syncs per parameter.
Measured on a 2-core CPU (load 0.3-0.6, quiet), tiny preset fp32 model (1.8M parameters, a training step
~70 ms): AdamW step 1.0-1.1 ms, a measured step 53-57 ms in all (about 50 AdamW steps, nearly a training step
of its own; measured before the moment and activation-gradient counts were added, which add a few elementwise
passes and one tensor hook per matmul input on measured steps only, not re-measured): keep `every` >= 10 where
throughput matters. Run loops exclude measured steps from throughput timing
(`measures(step)`).

Cost of the per-step non-finite tracking, on the same CPU (load 1.2-1.9: these runs plus another user's jobs),
tiny preset, `every` = 0: time spent in the hooks, `before_step` and `after_step` is 2.0-2.2 ms per step, 2.8-3.2%
of step time (fp32 and amp_bf16), of which ~0.6 ms is reading every gradient and weight once; the former
per-element counts (count_nonzero(t - t) per tensor) took 3.3-3.8 ms, 5.1-5.3%. End to end, samples/s with
the tracking on vs patched out (medians of 8 alternating 200-step runs each; run-to-run spread 8-15%, so
indicative only): fp32 -1.7% (per-element counts: -2.6%), amp_bf16 -3.9% (-6.8%). A small model at a small
batch is the worst case: the weight and gradient reads do not grow with batch x length, the step's work does.

Weight drift keeps one host copy of the initial weights (N x weight bytes); checkpoints do not store it (see
`state_dict`). Nothing extra stays on an accelerator, so its peak memory stays the training loop's own; on CPU
these host copies are part of the process's peak RSS.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import weakref
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from dtype_bench.precision import adamw_fp32_step, dtype_name

GroupOf = Callable[[str], str]

MEDIAN_SAMPLE = 2**20  # elements per group for the update/weight median
RESOLVED_CHANGE = 2.0**-20  # a relative moment change fp32 resolves (~8 ulps) and bf16 (half-ulp 2^-9) cannot
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


def _betas(hyper: dict) -> tuple[float, float]:
    return tuple(hyper["betas"]) if "betas" in hyper else (hyper["beta1"], hyper["beta2"])  # torch-optimi: beta1/2


def _debiased(state: dict, hyper: dict) -> bool:
    """torch-optimi stores bias-corrected moments (m_t / (1 - beta1^t), likewise v) and counts steps per group."""
    return "step" not in state and "beta1" in hyper


def steps_taken(state: dict, hyper: dict) -> float:
    if _debiased(state, hyper):
        return float(hyper.get("step", 0))
    return float(state["step"]) if state else 0.0


def stored_moments(state: dict) -> dict[str, torch.Tensor]:
    """The stored first and second moment tensors of an AdamW state, by role (bitsandbytes: state1, state2)."""
    out = {}
    for role, keys in (("exp_avg", ("exp_avg", "state1")), ("exp_avg_sq", ("exp_avg_sq", "state2"))):
        value = next((state[k] for k in keys if torch.is_tensor(state.get(k))), None)
        if value is not None:
            out[role] = value
    return out


def moments_fp32(state: dict, param: torch.Tensor, hyper: dict) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(first moment, second moment, steps taken) of an AdamW state in fp32, in torch.optim.AdamW's convention
    (no bias correction in the stored values); zeros before the first step; None for a state layout this module
    does not know (that parameter is then left out of the fidelity)."""
    steps = steps_taken(state, hyper)
    if not state:
        zeros = torch.zeros_like(param, dtype=torch.float32)
        return zeros, zeros, 0.0
    if "exp_avg" in state:  # torch.optim.AdamW, torchao, torch-optimi (quantized states dequantize on .float())
        first, second = state["exp_avg"].float(), state["exp_avg_sq"].float()
        if _debiased(state, hyper):
            beta1, beta2 = _betas(hyper)
            first, second = first * (1 - beta1**steps), second * (1 - beta2**steps)
        return first, second, steps
    if "state1" in state:  # bitsandbytes
        return _dequantize(state, 1, param), _dequantize(state, 2, param), steps
    return None


def next_moments_fp32(state: dict, grad: torch.Tensor, hyper: dict) -> dict[str, torch.Tensor]:
    """The values the stored moments would take after this step if the recurrence ran in fp32 from the stored
    values (in the optimizer's own convention), for the floating-point moments only (8-bit codes are left out)."""
    beta1, beta2 = _betas(hyper)
    if _debiased(state, hyper):  # torch-optimi's bias-corrected betas for the step about to be taken
        t = steps_taken(state, hyper) + 1
        beta1, beta2 = ((b**t - b) / (b**t - 1) for b in (beta1, beta2))
    grad = grad.float()
    targets = {"exp_avg": (grad, beta1), "exp_avg_sq": (grad.square(), beta2)}
    return {role: value.float().lerp(targets[role][0], 1 - targets[role][1])
            for role, value in stored_moments(state).items() if value.is_floating_point()}


def _second_moment(state: dict) -> torch.Tensor | None:
    value = stored_moments(state).get("exp_avg_sq")
    return value if value is not None and value.is_floating_point() else None


# ---------------------------------------------------------------- small tensor helpers


def tiny_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Elements that are zero or subnormal in the tensor's own dtype (NaN counts as neither)."""
    return t.abs() < torch.finfo(t.dtype).tiny


def underflow_counts(rows: torch.Tensor) -> torch.Tensor:
    """[elements, elements of structurally zero rows, zeros elsewhere, subnormals] of a 2-D view, as an int64
    device vector (no host sync). A row that is entirely zero is structural: an embedding row of a token absent
    from the batch, a position past the padded length, a unit no sample reached, an activation at a position the
    loss does not depend on. A zero inside a row that has non-zero elements is a value that flushed to zero; a
    subnormal is below the smallest normal of the tensor's own dtype (never in a structural row)."""
    zero = rows == 0
    structural = zero.all(1)
    zeros_elsewhere = (zero & ~structural[:, None]).sum()
    subnormal = (~zero & tiny_or_zero(rows)).sum()
    return torch.stack([torch.tensor(rows.numel(), device=rows.device), structural.sum() * rows.shape[1],
                        zeros_elsewhere, subnormal])


def underflow_fields(prefix: str, counts: dict[str, torch.Tensor]) -> dict:
    """Step-log fields from per-group `underflow_counts` sums: `<prefix>_zero_frac` and `<prefix>_subnormal_frac`
    over the elements of non-structural rows, `<prefix>_underflow_frac` their sum, and
    `<prefix>_structural_zero_frac` over all elements."""
    values = {g: c.tolist() for g, c in counts.items()}
    live = {g: n - structural for g, (n, structural, _, _) in values.items()}
    return {
        f"{prefix}_zero_frac": {g: v[2] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_subnormal_frac": {g: v[3] / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_underflow_frac": {g: (v[2] + v[3]) / live[g] if live[g] else None for g, v in values.items()},
        f"{prefix}_structural_zero_frac": {g: v[1] / v[0] if v[0] else None for g, v in values.items()},
    }


def extremes(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Min and max of each non-empty tensor, flattened as [min, max, min, max, ...] device scalars. NaN propagates
    into both and an infinity is one of them, so a tensor holds a non-finite element exactly when one of its
    extremes is non-finite; unlike a sum or a norm, a min or max cannot overflow, so large finite values (fp16
    activations near 65504, a finfo.min attention mask) are never mistaken for non-finite ones."""
    return [x for t in tensors if t.numel() for x in torch.aminmax(t.detach())]


def count_nonfinite(found: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many tensors among `found = extremes(...)` hold a non-finite element: an fp32 device scalar (no host
    sync; mixed dtypes promote in the stack without changing whether a value is finite)."""
    if not found:
        return torch.zeros((), device=device)
    return (~torch.stack(found).isfinite().view(-1, 2).all(1)).sum(dtype=torch.float32)


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
        self._params_of = {g: [p for _, p in self.named if self.group_of_param[p] == g] for g in self.groups}
        self._numel = {g: sum(p.numel() for p in self._params_of[g]) for g in self.groups}

        self.step = 0
        self.first_origin: dict | None = None  # {"step", "where"} of the first non-finite value
        self.fidelity_history: dict[str, list[float]] = {g: [] for g in self.groups}
        self.measured_steps = 0
        self._forward_extremes: list[list[torch.Tensor]] = [[] for _ in self.groups]  # per group, this step
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
        def hook(module, args, output):
            if module.training:  # evaluation forwards are not training steps
                self._forward_extremes[slot] += extremes(_output_tensors(output))
        return hook

    def _input_grad_hook(self, group: str):
        # A closure, like _forward_hook. Registers a tensor hook on the layer's input, once per tensor (q/k/v
        # share theirs), on the forwards of a measured step: the gradient it sees is what backward computed for
        # that activation, in its own dtype, with the loss scale applied.
        def pre_hook(module, args):
            x = args[0] if args else None
            if not (self._armed and module.training and torch.is_grad_enabled() and torch.is_tensor(x)
                    and x.requires_grad):
                return
            hooked = self._act_hooked.get(id(x))
            if hooked is None or hooked() is not x:
                self._act_hooked[id(x)] = weakref.ref(x)
                x.register_hook(functools.partial(self._count_activation_grad, group))
        return pre_hook

    def _count_activation_grad(self, group: str, grad: torch.Tensor) -> None:
        counts = underflow_counts(grad.detach().reshape(-1, grad.shape[-1]))
        self._act_counts[group] = self._act_counts[group] + counts if group in self._act_counts else counts
        self._act_dtypes.setdefault(group, set()).add(dtype_name(grad.dtype))

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
        forward = [count_nonfinite(found, self.device) for found in self._forward_extremes]
        self._forward_extremes = [[] for _ in self.groups]
        grads = [count_nonfinite(extremes(p.grad for p in self._params_of[g] if p.grad is not None), self.device)
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
        before, intended, moments, ratios = {}, {}, {}, {g: [] for g in self.groups}
        for _, p in with_grad:
            group = self.group_of_param[p]
            grad = p.grad.detach()
            counts = underflow_counts(grad.reshape(grad.shape[0], -1) if grad.ndim >= 2 else grad.reshape(1, -1))
            grad_counts[group] = grad_counts[group] + counts if group in grad_counts else counts
            hyper, state = self._hyper[p], self.optimizer.state.get(p, {})
            moments[p] = self._moment_snapshot(state, grad, hyper)
            adam_moments = moments_fp32(state, p, hyper)
            if adam_moments is None:
                continue
            beta1, beta2 = _betas(hyper)
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
        return {"before": before, "intended": intended, "moments": moments}

    @staticmethod
    def _moment_snapshot(state: dict, grad: torch.Tensor, hyper: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per floating-point moment: (its stored value before the step, on the host; which elements the fp32
        recurrence from that stored value would change by more than `RESOLVED_CHANGE` of their magnitude, far
        below bf16's half-ulp 2^-9 and far above fp32's rounding). Empty before the first step (no state yet)."""
        if not state:
            return {}
        stored = stored_moments(state)
        out = {}
        for role, target in next_moments_fp32(state, grad, hyper).items():
            value = stored[role].detach()
            changes = (target - value.float()).abs() > RESOLVED_CHANGE * value.float().abs()
            out[role] = (value.to("cpu", copy=True), changes.cpu())
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Call right after `scaler.step(optimizer)` / `optimizer.step()`."""
        self._armed = self.measures(self.step + 1)
        self._step_counts += [count_nonfinite(extremes(self._params_of[g]), self.device) for g in self.groups]
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
        small, total = {g: 0 for g in self.groups}, {g: 0 for g in self.groups}
        for _, p in self.named:
            second = _second_moment(self.optimizer.state.get(p, {}))
            if second is not None:
                small[self.group_of_param[p]] += int(tiny_or_zero(second).sum())
                total[self.group_of_param[p]] += second.numel()
        self._fields["second_moment_underflow_frac"] = {g: small[g] / total[g] for g in self.groups if total[g]}

    def _moment_update_lost(self, snapshots: dict) -> dict[str, dict[str, float]]:
        """Per moment and group: of the elements the fp32 recurrence would have changed, the fraction whose
        stored value is bit-identical after the step (the write rounded the change away)."""
        lost, changing = {}, {}
        for p, roles in snapshots.items():
            stored, group = stored_moments(self.optimizer.state.get(p, {})), self.group_of_param[p]
            for role, (before, changes) in roles.items():
                unchanged = stored[role].detach().cpu() == before
                lost.setdefault(role, {}).setdefault(group, 0)
                changing.setdefault(role, {}).setdefault(group, 0)
                lost[role][group] += int((changes & unchanged).sum())
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
