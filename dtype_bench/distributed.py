"""Data-parallel training under torchrun (DDP): NCCL on GPU, gloo on CPU.

    torchrun --nproc_per_node N experiments/classification/run.py --config amp_bf16 --seed 0

How micro-batch, accumulation and world size combine: the *effective batch* is always
`batch_size x gradient_accumulation_steps`, whatever the world size, so a DDP run trains the same recipe
as a single process. Each optimizer step consists of the same `gradient_accumulation_steps` micro-batches
of `batch_size` documents as in one process; rank r computes micro-batches r, r + N, r + 2N, ... of the step,
i.e. `gradient_accumulation_steps / N` of them (N must divide gradient_accumulation_steps), and DDP averages
the gradients. Each rank divides its loss by its own micro-batch count, so the averaged gradient is the
single-process gradient up to summation order. Every micro-batch is padded exactly as in one process.

Randomness is tied to *where* in training it is used, not to the process: `reseed` sets the torch RNG from
(seed, micro-batch index) before each micro-batch (dropout) and from (seed, step) before each optimizer step
(stochastic rounding), so ranks agree, N ranks match one process, and a resumed run matches an
uninterrupted one.

Rank 0 alone evaluates, checkpoints, writes the step log and the results row; the per-step signals it logs
are reduced over ranks first (see TrainingMonitor). A sweep is not run under torchrun: launch one torchrun
per grid point (`run.py --config all --list_runs | xargs -L1 torchrun ... run.py <flags>`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_accumulation(self, gradient_accumulation_steps: int) -> int:
        """Micro-batches this rank computes per optimizer step."""
        if gradient_accumulation_steps % self.world_size:
            raise ValueError(
                f"--gradient_accumulation_steps {gradient_accumulation_steps} is not divisible by the world size "
                f"{self.world_size}: each rank computes gradient_accumulation_steps / world_size micro-batches so "
                "that the effective batch stays batch_size x gradient_accumulation_steps")
        return gradient_accumulation_steps // self.world_size

    def micro_batch_index(self, step: int, local_index: int, gradient_accumulation_steps: int) -> int:
        """Global index (0-based, counted over the whole run) of this rank's `local_index`-th micro-batch of
        optimizer step `step` (0-based)."""
        return step * gradient_accumulation_steps + local_index * self.world_size + self.rank


SINGLE_PROCESS = World()


def current_world() -> World:
    """The world this process joined (`init_from_env`), or a single process."""
    if not dist.is_initialized():
        return SINGLE_PROCESS
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); without
    torchrun, a single process. On CUDA each rank takes GPU LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE_PROCESS, device
    world = World(rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 evaluates and checkpoints while the others wait in the next gradient all-reduce.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return world, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP for a multi-process world, the model itself otherwise. Buffers are not broadcast each forward:
    the models here hold only constant buffers (position ids)."""
    if not world.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step (`sync=False`)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def reseed(seed: int, *where: int) -> None:
    """Set the global torch RNG (CPU and CUDA) from (seed, *where) alone."""
    torch.manual_seed(int(np.random.SeedSequence([seed, *where]).generate_state(1, np.uint64)[0] >> 1))


def all_agree(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one small all-reduce; a plain bool alone)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(value: int) -> int:
    """Rank 0's integer on every rank (e.g. a decision only rank 0 can take)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=_collective_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_step_signals(values: torch.Tensor, mean: list[int], maximum: list[int], total: list[int]) -> torch.Tensor:
    """Per-step signals (rows = steps) reduced over ranks column by column: mean, max or sum; other columns
    are already equal on every rank (e.g. the grad norm after DDP's all-reduce)."""
    if not dist.is_initialized():
        return values
    summed, maxed = values.clone(), values.clone()
    dist.all_reduce(summed)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    out = values.clone()
    out[:, mean] = summed[:, mean] / dist.get_world_size()
    out[:, maximum] = maxed[:, maximum]
    out[:, total] = summed[:, total]
    return out


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def main_process_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preparing a cache), the others after it, then all continue."""
    if not world.is_main:
        barrier()
    yield
    if world.is_main:
        barrier()
