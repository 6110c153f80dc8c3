"""Block-by-block conversion against the teacher (as GPTQ and SliceGPT process a model).

The calibration windows' hidden states are run through one decoder block at a time, teacher and
student in lockstep: the teacher's states ``t`` through the original block, the student's ``s``
(those the already converted blocks before produce) through the block being converted.  For each
block holding a layer to convert:

1. ``t' = block(t)`` with the original weights (the teacher's target);
2. with ``sequential``, the output projection's input statistics are collected on ``s`` (the
   inputs the converted student really produces; that pass stops at the projection) and the
   layer is fitted on them; otherwise the fit made on the teacher's statistics is used; the fit
   is swapped in;
3. with ``compensate``, the dense maps the adapter names (``Adapter.residual_maps``, the MLP
   down-projection) are refitted so that the block's output matches ``t'``
   (:mod:`hadaconv.compensate`);
4. ``s' = block(s)`` with the converted, compensated block.

Only one block is touched at a time, through :meth:`Decoder.block`, and :meth:`Decoder.done` is
called once the loop is through with it: the teacher's pass runs on the same weights before the
swap, so a decoder that loads a block's weights in ``block(i)`` and writes and frees them in
``done(i)`` (:class:`hadaconv.stream.ShardDecoder`, ``convert --streamed``) holds one block at a
time whatever the depth.  Blocks before the first converted one run once (student = teacher);
blocks after the last converted one are not run at all.  Statistics that the teacher's pass can
give (every layer's when not ``sequential``; the first layer's while the student still equals the
teacher; with ``on_teacher``, every layer's for that callback) are collected during that pass, not
in a pass of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hadaconv.adapters import Adapter, AttentionLayer, block_list, holds
from hadaconv.calibrate import MomentCollector, Moments
from hadaconv.compensate import RidgeSums, refit
from hadaconv.fit import FitResult
from hadaconv.progress import progress
from hadaconv.report import LayerReport
from hadaconv.swap import apply_fit

__all__ = ["BlockInput", "Decoder", "TeacherFn", "block_pass", "convert_blockwise", "decoder", "hidden_of"]


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass early: what follows cannot change what was
    captured."""


@dataclass
class BlockInput:
    """What one batch hands the first block: positional ``args`` (``args[0]`` the hidden state,
    replaced block after block), ``kwargs`` (masks, position embeddings: the same for every
    block), and the split ("calib" or "heldout") the batch belongs to."""

    args: tuple
    kwargs: dict
    split: str

    def raw(self, block: nn.Module, hidden: torch.Tensor):
        """What ``block`` returns for ``hidden`` in place of the captured one, in its own form."""
        return block(hidden, *self.args[1:], **self.kwargs)

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``block``'s output hidden state for ``hidden`` in place of the captured one."""
        return hidden_of(self.raw(block, hidden))


def hidden_of(output) -> torch.Tensor:
    """The hidden state a block returned (alone, or first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Decoder:
    """A model as its sequence of decoder blocks.  ``block(i)`` is the only way the loop reaches
    block i, so a subclass can load its weights on demand."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], kind: str,
                 device: torch.device | None = None) -> None:
        self.model, self.blocks, self.kind = model, blocks, kind
        # None: the device of the model's first parameter
        self.device = device

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> nn.Module:
        """Block ``i``, ready to run."""
        return self.blocks[i]

    def done(self, i: int) -> None:
        """The loop is through with block ``i`` (converted or not); nothing to do in memory."""

    def model_kwargs(self, batch: dict) -> dict:
        """``batch`` as keyword arguments of the model: on its device, without a KV cache."""
        device = self.device
        if device is None:
            param = next(self.model.parameters(), None)
            device = None if param is None else param.device
        if device is not None:  # batches live on the CPU; the model may not
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return {**batch, "use_cache": False} if self.kind == "causal-lm" else batch

    @torch.no_grad()
    def first_inputs(self, batches: list[tuple[str, dict]]) -> list[BlockInput]:
        """Run the model up to the first block for each (split, batch); capture that block's input."""
        captured: list[BlockInput] = []

        def hook(module, args, kwargs):
            if not args:
                args, kwargs = (kwargs.pop("hidden_states"),), kwargs
            captured.append(BlockInput(tuple(args), dict(kwargs), split))
            raise _Stop

        # The hook stops the model before block 0 runs: its weights are not needed here.
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for split, batch in batches:
                try:
                    self.model(**self.model_kwargs(batch))
                except _Stop:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def replays_model(self, batch: dict) -> bool:
        """Whether chaining the blocks on captured inputs reproduces the model's own last block
        output for ``batch`` (False for models that change block arguments between blocks)."""
        seen = {}
        handle = self.block(len(self) - 1).register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
        try:
            self.model(**self.model_kwargs(batch))
        finally:
            handle.remove()
        expected = hidden_of(seen["out"])
        if not torch.isfinite(expected).all():  # nothing to compare with; convert's statistics check
            return False                        # then names the first layer whose inputs are not finite
        inp = self.first_inputs([("calib", batch)])[0]
        hidden = inp.args[0]
        for i in range(len(self)):
            hidden = inp.call(self.block(i), hidden)
        return torch.allclose(hidden, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def decoder(model: nn.Module, layers: list[AttentionLayer], kind: str) -> Decoder | None:
    """The model's decoder blocks, or None where the blocks cannot be run one at a time."""
    found = block_list(model, layers)
    return Decoder(model, list(found[1]), kind) if found else None


def _residual_maps(block: nn.Module, adapter: Adapter) -> list[nn.Linear]:
    maps = []
    for path in adapter.residual_maps:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            maps.append(module)
    return maps


FitFn = Callable[[AttentionLayer, Moments, Moments | None], tuple[FitResult, LayerReport]]
#: ``on_teacher(layer, calib, heldout)``: called with a layer's statistics on the teacher's inputs.
TeacherFn = Callable[[AttentionLayer, Moments, Moments | None], None]


def block_pass(block: nn.Module, inputs: list[BlockInput], hidden: list[torch.Tensor], layers: list[AttentionLayer],
               device) -> tuple[MomentCollector, list[torch.Tensor]]:
    """``block``'s outputs for every window, and the input moments of ``layers``' output
    projections collected on the way (per split, on ``device``; None: the activations')."""
    stats = MomentCollector({layer.index: layer.out_module for layer in layers}, device)
    outs = []
    with stats.hooked():
        for inp, h in zip(inputs, hidden):
            stats.split = inp.split
            outs.append(inp.call(block, h))
    return stats, outs


def _moments(block: nn.Module, inputs: list[BlockInput], hidden: list[torch.Tensor], layer: AttentionLayer,
             device) -> MomentCollector:
    """The input moments of ``layer``'s output projection for every window (per split, on
    ``device``).  Each window's pass stops at that projection: what the block computes from it on
    (the projection itself and, in a pre-norm block, the whole MLP: two thirds of SmolLM2's
    multiply-adds) cannot change its input.  The first window runs whole, and the others stop only
    if the projection ran once in it (one called twice must be seen twice), and never in a block
    whose weights accelerate offloads (its hooks put them back only when the block returns)."""
    offloaded = any(hasattr(m, "_hf_hook") for m in block.modules())
    calls, stop = [], False

    def count(module, args):
        calls[-1] += 1
        if stop:
            raise _Stop

    stats = MomentCollector({layer.index: layer.out_module}, device)
    with stats.hooked():  # the collector's hook is registered first, so it runs before the stop
        handle = layer.out_module.register_forward_pre_hook(count)
        try:
            for inp, h in zip(inputs, hidden):
                stats.split = inp.split
                calls.append(0)
                try:
                    inp.call(block, h)
                except _Stop:
                    pass
                stop = calls[0] == 1 and not offloaded
        finally:
            handle.remove()
    return stats


def convert_blockwise(dec: Decoder, adapter: Adapter, layers: list[AttentionLayer], data_batches: list[tuple[str, dict]],
                      fits: dict[int, FitResult], rows: dict[int, LayerReport], *, sequential: bool,
                      compensate: bool, fit_fn: FitFn, show: bool = True, stats_device: str | None = None,
                      on_teacher: TeacherFn | None = None) -> None:
    """Convert ``layers`` block by block (see the module docstring), in place.

    ``fits`` holds the teacher-statistics fits (used when not ``sequential``; a layer missing
    from it is fitted on the teacher's statistics collected here; with ``sequential`` every
    layer is refitted on the student's) and ``rows`` their report rows (updated: sequential
    errors, block errors before/after compensation, the ridge chosen).  ``fit_fn(layer, calib,
    heldout)`` fits one layer on given statistics, accumulated in float64 on ``stats_device``
    (None: where the activations are).  ``on_teacher(layer, calib, heldout)``, when given, is
    called for every layer with the teacher's statistics of it, before anything in its block is
    swapped (the blocks from it on are still the original's): convert measures each layer's
    sensitivity there, without a statistics pass of its own.  ``dec.done(i)`` is called for
    every block, in order.
    """
    inputs = dec.first_inputs(data_batches)
    teacher = [inp.args[0] for inp in inputs]
    student: list[torch.Tensor] | None = None  # None: the same as the teacher's so far
    holding = [pos for pos in range(len(dec)) if any(holds(dec.blocks[pos], layer) for layer in layers)]
    last = holding[-1] if holding else -1
    # The count runs to the last block holding a chosen layer: the blocks after it are only released.
    with progress(last + 1, "convert block by block" + (" (sequential)" if sequential else ""), show) as step, \
            torch.no_grad():  # not inference_mode: the fits below run autograd on these statistics
        for pos in range(len(dec)):
            block = dec.block(pos)
            if pos > last:  # nothing after it needs these blocks' outputs
                dec.done(pos)
                continue
            here = [layer for layer in layers if holds(block, layer)]
            s_in = teacher if student is None else student
            # Layers fitted on the teacher's statistics: every one when not sequential; with it, the
            # first one swapped while the student still equals the teacher.
            teacher_fitted = [la for la in here if not sequential or (student is None and la is here[0])]
            # The teacher's pass gives those statistics (the swap has not happened yet).
            early = here if on_teacher is not None else [
                la for la in teacher_fitted if sequential or la.index not in fits]
            stats, nxt_teacher = block_pass(block, inputs, teacher, early, stats_device)
            if not here:
                student = None if student is None else block_pass(block, inputs, student, [], None)[1]
                teacher = nxt_teacher
                dec.done(pos)
                step()
                continue
            if on_teacher is not None:
                for layer in here:
                    with torch.enable_grad():
                        on_teacher(layer, stats.moments(layer.index), stats.moments(layer.index, "heldout"))
            _fit_and_swap(block, here, inputs, s_in, stats, teacher_fitted, fits, rows, sequential, fit_fn,
                          stats_device)
            del stats
            maps = _residual_maps(block, adapter) if compensate else []
            if maps:
                student = _compensate(block, maps, inputs, s_in, teacher, nxt_teacher, rows[here[0].index])
            else:
                student = block_pass(block, inputs, s_in, [], None)[1]
            teacher = nxt_teacher
            dec.done(pos)
            step()


def _fit_and_swap(block: nn.Module, here: list[AttentionLayer], inputs: list[BlockInput], s_in: list[torch.Tensor],
                  stats: MomentCollector, teacher_fitted: list[AttentionLayer], fits: dict[int, FitResult],
                  rows: dict[int, LayerReport], sequential: bool, fit_fn: FitFn, stats_device) -> None:
    """Fit the block's layers that need it, in order (on ``stats`` of the teacher's pass where
    they are in ``teacher_fitted``, else on the student's inputs ``s_in`` with the layers before
    already swapped), and swap each in."""
    for layer in here:
        if sequential or layer.index not in fits:
            if not any(layer is la for la in teacher_fitted):
                stats = _moments(block, inputs, s_in, layer, stats_device)
            with torch.enable_grad():
                fits[layer.index], rows[layer.index] = fit_fn(
                    layer, stats.moments(layer.index), stats.moments(layer.index, "heldout"))
        apply_fit(layer, fits[layer.index])


def _compensate(block, maps, inputs, s_in, t_in, t_out, row: LayerReport) -> list[torch.Tensor]:
    """Refit each map in turn towards the teacher's block output; return the student's outputs."""
    s_out: list[torch.Tensor] = []
    for k, lin in enumerate(maps):
        us: list[torch.Tensor] = []
        handle = lin.register_forward_pre_hook(lambda m, args: us.append(args[0].detach()))
        try:
            s_out = [inp.call(block, h) for inp, h in zip(inputs, s_in)]
        finally:
            handle.remove()
        w0, b0 = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
        sums = {"calib": RidgeSums(bias=b0 is not None), "heldout": RidgeSums(bias=b0 is not None)}
        for inp, u, s, t, x in zip(inputs, us, s_out, t_out, t_in):
            own = u @ w0.T + (b0 if b0 is not None else 0)
            sums[inp.split].add(u, t - s + own, t - x)
        comp = refit(w0, b0, sums["calib"], sums["heldout"])
        if k == 0:
            row.block_error_before = comp.error_before
        row.block_error_after, row.compensation_ridge = comp.error_after, comp.alpha
        if comp.alpha is None:
            continue
        with torch.no_grad():
            lin.weight.copy_(comp.weight.to(lin.weight.dtype))
            if b0 is not None:
                lin.bias.copy_(comp.bias.to(lin.bias.dtype))
        dw = lin.weight.detach() - w0
        db = (lin.bias.detach() - b0) if b0 is not None else 0
        s_out = [s + u @ dw.T + db for s, u in zip(s_out, us)]
    return s_out
