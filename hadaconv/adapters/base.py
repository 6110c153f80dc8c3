"""What an architecture adapter tells the rest of hadaconv.

An adapter knows one family of models (Llama, GPT-2, BERT, ...) and nothing else does: it
finds the attention blocks and, for each, describes

* the output projection W_o (where it lives, how to read its weight as ``y = W x + b`` and how to
  put a replacement in its place),
* the value projection, possibly a slice of a fused QKV weight, as the rows that produce each
  KV head's value channels (so a per-head matrix can be folded into it exactly),
* the head layout (query heads, KV heads, head dim).

Everything downstream (calibration hooks, the fit, folding, saving, loading) works on these
descriptions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

ModelKind = Literal["causal-lm", "encoder", "classifier", "module"]


@dataclass
class WeightSlot:
    """A dense projection's weight, read and written as ``y = W x + b`` (W is [out, in]).

    ``weight`` and ``bias`` are the module's own parameters.  ``rows`` selects the output rows
    that belong to this slot (a fused QKV weight holds several projections); None means all.
    ``transposed`` is True for weights stored as [in, out] (GPT-2's Conv1D, fused in_proj
    stored that way).  ``bias_rows`` selects the bias entries when they are not ``rows``:
    ``nn.MultiheadAttention`` with separate q/k/v weights still packs the three biases into one
    ``in_proj_bias``; None means the same as ``rows``.

    ``column`` is a learned vector in the slot's output space that is not computed from the
    input (``nn.MultiheadAttention``'s ``bias_v``, the value of the extra key/value position of
    ``add_bias_kv``, one entry per slot row).  :meth:`get` appends it to W as a last column and
    :meth:`set` splits it off again, so every map applied to W's rows (the folded value map)
    transforms it too: it is W's column for an input that is 1 at the extra position.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None = None
    rows: torch.Tensor | None = None
    transposed: bool = False
    bias_rows: torch.Tensor | None = None
    column: nn.Parameter | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of W as :meth:`get` returns it, without copying."""
        w = self.weight.T if self.transposed else self.weight
        rows = len(self.rows) if self.rows is not None else w.shape[0]
        return rows, w.shape[1] + (self.column is not None)

    def _bias_index(self) -> torch.Tensor | slice:
        index = self.bias_rows if self.bias_rows is not None else self.rows
        return index if index is not None else slice(None)

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Detached copies of (W [out, in], b [out] or None)."""
        w = self.weight.detach()
        w = w.T if self.transposed else w
        if self.rows is not None:
            w = w[self.rows]
        b = self.bias.detach()[self._bias_index()] if self.bias is not None else None
        if self.column is not None:
            w = torch.cat([w, self.column.detach().reshape(-1, 1).to(w.dtype)], dim=1)
        return w.clone(), (b.clone() if b is not None else None)

    @torch.no_grad()
    def set(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        """Write (W, b) back in place, in the parameters' own dtype and layout."""
        if self.column is not None:
            self.column.copy_(w[:, -1].reshape(self.column.shape).to(self.column.dtype))
            w = w[:, :-1]
        rows = self.rows if self.rows is not None else slice(None)
        target = self.weight.T if self.transposed else self.weight
        target[rows] = w.to(target.dtype)
        if b is not None:
            if self.bias is None:
                raise ValueError("cannot fold a bias into a projection that has none")
            self.bias[self._bias_index()] = b.to(self.bias.dtype)


@dataclass
class AttentionLayer:
    """One attention block, as the converter sees it.

    The output projection's input is the concatenation of the query heads' outputs: channels
    ``h*head_dim:(h+1)*head_dim`` belong to query head h, which reads KV head
    ``h // (num_heads // num_kv_heads)``.  ``value.rows`` are ordered KV head by KV head, head_dim
    rows each.
    """

    index: int
    name: str  # qualified name of the attention block, for reports
    out_name: str  # qualified name of the output projection module
    parent: nn.Module  # the module holding the output projection as attribute ``attr``
    attr: str
    out: WeightSlot
    value: WeightSlot | None  # None: nothing to fold into (affine fit only)
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Input width of the output projection (heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def out_features(self) -> int:
        """Output width of the output projection (the model width)."""
        return self.out.shape[0]

    @property
    def out_module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def replace_out(self, module: nn.Module) -> None:
        """Install ``module`` in place of the output projection."""
        setattr(self.parent, self.attr, module)


@dataclass(frozen=True)
class ResidualStream:
    """Where a pre-norm decoder reads and writes its residual stream, for a rotation of it
    (:mod:`hadaconv.rotation`).  ``embedding``, ``blocks`` (the block list), ``final_norm`` and
    ``head`` are dotted paths from the model; ``reads`` pairs each norm inside a block with the
    Linears that read its output, ``writes`` names the block's Linears that add into the stream."""

    embedding: str
    blocks: str
    reads: tuple[tuple[str, tuple[str, ...]], ...]
    writes: tuple[str, ...]
    final_norm: str
    head: str


@dataclass
class Adapter:
    """An architecture family: how to recognise it and where its attention blocks are.

    ``layers(model)`` returns the attention blocks in order.  ``prepare(model)`` (optional)
    rewrites modules that cannot be hooked or swapped as they are (``nn.MultiheadAttention``
    calls its output projection functionally) into equivalent ones that can; it is idempotent
    and is also applied when a converted model is loaded.  ``residual_maps`` names the dense
    neighbours error compensation may refit.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    layers: Callable[[nn.Module], list[AttentionLayer]]
    kind: Callable[[nn.Module], ModelKind] = field(default=lambda model: "module")
    prepare: Callable[[nn.Module], None] = field(default=lambda model: None)
    #: Dotted paths, relative to a decoder block (the entry of the model's block list holding an
    #: attention layer), of dense ``nn.Linear`` maps that write into the residual stream after
    #: the attention output (an MLP's down-projection): the conversion may refit them to
    #: compensate the block's error (:mod:`hadaconv.compensate`).  Empty: nothing compensated.
    residual_maps: tuple[str, ...] = ()
    #: The residual stream's readers and writers, where the family's stream can be rotated
    #: (:mod:`hadaconv.rotation`); None: it is not.
    residual_stream: ResidualStream | None = None
