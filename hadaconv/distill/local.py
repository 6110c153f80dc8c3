"""The local stage: each converted attention block learns to reproduce the teacher's block.

Teacher-forced: one teacher pass over a few windows records, for every converted block, what
enters it (the teacher's hidden states after the block's input norm, plus the rotary
embeddings, masks and other keyword arguments the layer passes) and what it returns.  Then the
student's blocks are trained one at a time on those pairs with a relative MSE; nothing else of
the model runs, so a step costs one attention block.  Blocks are independent here, which makes
the stage cheap but blind to how errors compound through the depth (the global stage sees that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hadaconv.distill.parallel import Dist

__all__ = ["BlockResult", "reconstruct_blocks"]


@dataclass
class BlockResult:
    name: str
    error_before: float  # relative squared error of the block's output vs the teacher's
    error_after: float


Record = tuple[tuple, dict, torch.Tensor]  # (args, kwargs, teacher output)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _first(output: Any) -> torch.Tensor:
    """Attention modules return a tensor or a tuple whose first element is the output."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _record(teacher: nn.Module, blocks: list[str], run: Callable[[torch.Tensor], None],
            batches: list[torch.Tensor]) -> dict[str, list[Record]]:
    records: dict[str, list[Record]] = {name: [] for name in blocks}

    def hook(name: str):
        def fn(module, args, kwargs, output):
            records[name].append((_detach(args), _detach(kwargs), _first(output).detach()))
        return fn

    handles = [teacher.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in blocks]
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for h in handles:
            h.remove()
    return records


def _error(block: nn.Module, records: list[Record], d: Dist) -> float:
    num = den = 0.0
    with torch.no_grad():
        for args, kwargs, target in records:
            y = _first(block(*args, **kwargs)).float()
            num += (y - target.float()).square().sum().item()
            den += target.float().square().sum().item()
    return d.sum(num) / max(d.sum(den), 1e-30)


def reconstruct_blocks(
    student: nn.Module,
    teacher: nn.Module,
    blocks: list[str],
    windows: torch.Tensor,
    run_teacher: Callable[[torch.Tensor], None],
    *,
    batch_size: int,
    steps: int,
    lr: float,
    clip: float,
    d: Dist,
    autocast: Callable[[], Any],
    on_block: Callable[[], None] | None = None,
) -> list[BlockResult]:
    """Train each of the student's ``blocks`` (qualified module names, shared with the teacher)
    to map the teacher's block inputs to the teacher's block outputs; returns the errors.

    ``windows`` [N, L] are cut into global batches of ``batch_size`` (each rank records its own
    shard); step s uses batch ``s mod (N / batch_size)``, so the result does not depend on the
    number of ranks.  Only parameters of the block that require gradients are trained.
    """
    batches = [d.shard(windows[i:i + batch_size]).to(d.device)
               for i in range(0, len(windows) - batch_size + 1, batch_size)]
    records = _record(teacher, blocks, run_teacher, batches)
    results = []
    for name in blocks:
        block = student.get_submodule(name)
        params = [p for p in block.parameters() if p.requires_grad]
        before = _error(block, records[name], d)
        # One fixed scale per block (the teacher output's mean square over all ranks' records),
        # so the ranks' mean losses average to the loss of one process seeing every window.
        scale = d.sum(sum(t.float().square().sum().item() for _, _, t in records[name])) / \
            max(1.0, d.sum(sum(t.numel() for _, _, t in records[name])))
        if params and steps > 0:
            start = [p.detach().clone() for p in params]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            warmup = max(1, steps // 4)  # Adam's first steps are sign-like: ease in
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
                args, kwargs, target = records[name][step % len(records[name])]
                with autocast():
                    y = _first(block(*args, **kwargs))
                loss = (y.float() - target.float()).square().mean() / max(scale, 1e-30)
                loss.backward()
                d.average_grads(params)
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            after = _error(block, records[name], d)
            if after > before:  # never leave a block worse than the least-squares fit left it
                with torch.no_grad():
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
                after = before
        else:
            after = before
        results.append(BlockResult(name, before, after))
        del records[name]  # free the block's cache as soon as it is done
        if on_block is not None:
            on_block()
    return results
