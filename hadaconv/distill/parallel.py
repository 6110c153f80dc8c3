"""Process groups for distillation under ``torchrun``: DDP by default, FSDP2 on request.

``torchrun --nproc-per-node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`setup` then joins the default process group (NCCL on GPUs, gloo on CPUs).  A
caller that already initialised a group (tests, notebooks) keeps its own.  Every rank loads the
same models, takes its own contiguous shard of each global batch, and the gradient average over
ranks makes a step equal to one process computing the whole batch.

FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) is for models that do not fit one device: each
``_no_split_modules`` block (the decoder layers of a Hugging Face model) becomes one unit, then
the root; the frozen teacher is sharded the same way.  Parameters become DTensors, so saving and
checkpointing gather full state dicts first (:mod:`torch.distributed.checkpoint.state_dict`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from hadaconv.errors import HadaconvError, InputError, option

__all__ = ["Dist", "is_main", "setup"]


@dataclass
class Dist:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (its length divisible by ``world``)."""
        per = len(batch) // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def sum(self, value: float) -> float:
        """The sum over ranks of a Python number (the number itself in one process)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (time limits must stop all ranks at once)."""
        return self.sum(float(flag)) > 0 if self.active else flag

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients over ranks by hand (the local stage trains blocks outside DDP)."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (also after the process group was torn down)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str | None = None) -> Dist:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    owns = False
    if world_env > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device is not None and not device.startswith("cuda"):
        dev = torch.device(device)
    elif use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device())
    elif device is not None:
        raise HadaconvError(f"{option('device', device)}: CUDA is not available here")
    else:
        dev = torch.device("cpu")
    return Dist(rank=rank, world=world, device=dev, owns_group=owns)


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module to train through: the model itself (one process), DDP, or FSDP2 in place."""
    if fsdp:
        shard(model, d)
        return model
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def several_processes() -> bool:
    """Whether this process is one of several: a process group of more than one, or the
    ``WORLD_SIZE`` torchrun sets for the group :func:`setup` will join."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1


def fsdp_needs_processes() -> InputError:
    """The one error for FSDP asked of a single process (the config check and the run's own)."""
    return InputError(f"{option('fsdp')} needs several processes: run under torchrun --nproc-per-node N")


def shard(model: nn.Module, d: Dist) -> None:
    """FSDP2: every ``_no_split_modules`` block is one unit, then the root."""
    if not d.active:
        raise fsdp_needs_processes()
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise HadaconvError(f"{option('fsdp')}: {type(model).__name__} names no blocks to shard (_no_split_modules)")
    for m in units:
        fully_shard(m)
    fully_shard(model)


def no_sync(model: nn.Module, last: bool) -> ContextManager:
    """Skip the gradient reduction on all but the last micro-batch of a step (DDP or FSDP2)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 toggles a flag instead
        model.set_requires_gradient_sync(last)
        return nullcontext()
    if last or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()
