"""A drop-in ``nn.MultiheadAttention`` whose output projection is a real submodule call.

``nn.MultiheadAttention.forward`` hands ``out_proj.weight`` to
``F.multi_head_attention_forward``, so replacing ``out_proj`` changes nothing and hooks on it
never fire.  :class:`HookableMultiheadAttention` is a subclass with the very same parameters
(same names, so state dicts are interchangeable) whose forward computes the same function and
ends with ``self.out_proj(heads)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HookableMultiheadAttention", "prepare_mha"]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = masked out) as an additive float mask; float masks pass through."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class HookableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the same parameters, signature and results, except that
    the output projection is applied by calling ``self.out_proj`` (which may be any module
    mapping [..., embed_dim] to [..., embed_dim]).

    Build one from an existing module with :meth:`from_module`; it shares that module's
    parameter objects.
    """

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> HookableMultiheadAttention:
        """The equivalent hookable module, sharing ``mha``'s parameters and submodules."""
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",  # placeholders only: every parameter is replaced just below
        )
        for name, param in mha.named_parameters(recurse=False):
            setattr(new, name, param)
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same contract as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # From here on everything is batch first: [B, L, E] queries, [B, S, *] keys/values.
        bsz, tgt_len, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        padding = _additive(key_padding_mask, query.dtype)
        # Like nn.MultiheadAttention: the is_causal hint replaces the mask only where SDPA's own
        # causal masking gives the same result (no padding mask, no weights to return).
        causal = is_causal and padding is None and not need_weights
        mask = None if causal else _additive(attn_mask, query.dtype)
        if mask is not None:
            mask = mask.view(bsz, heads, tgt_len, -1) if mask.dim() == 3 else mask.view(1, 1, tgt_len, -1)

        q, k, v = self._project(query, key, value)
        extra = []  # key/value positions appended after the source sequence
        if self.bias_k is not None:
            extra.append((self.bias_k.expand(bsz, 1, -1), self.bias_v.expand(bsz, 1, -1)))
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz, 1, self.embed_dim)
            extra.append((zeros, zeros))
        if extra:
            k = torch.cat([k, *(pair[0] for pair in extra)], dim=1)
            v = torch.cat([v, *(pair[1] for pair in extra)], dim=1)
            mask = F.pad(mask, (0, len(extra))) if mask is not None else None
            padding = F.pad(padding, (0, len(extra))) if padding is not None else None
        if padding is not None:
            padding = padding.view(bsz, 1, 1, -1)
            mask = padding if mask is None else mask + padding

        q, k, v = (t.view(bsz, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)

        # [B, H, L, D] -> [B, L, H * D]: query heads side by side, as the projection expects.
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _disable_fused_paths(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoder(Layer)`` off its fused inference kernels.

    In eval mode without autograd they call ``torch._transformer_encoder_layer_fwd`` with
    ``self_attn.in_proj_weight`` and ``self_attn.out_proj.weight`` directly, bypassing our
    forward (and failing once out_proj is not a Linear).  Both attributes below are read only
    to choose that path (torch 2.x ``transformer.py``): ``activation_relu_or_gelu`` = 0 means
    "no fused activation" (the ordinary path still applies ``self.activation``), and
    ``use_nested_tensor`` = False stops the encoder from packing padded batches into nested
    tensors for those kernels.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(
            module.self_attn, HookableMultiheadAttention
        ):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def prepare_mha(model: nn.Module) -> None:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a HookableMultiheadAttention
    (in place, sharing parameters; idempotent).  A bare ``nn.MultiheadAttention`` given as
    ``model`` itself cannot be replaced in place: wrap it, or use ``from_module``."""
    targets = [
        (parent, attr, child)
        for parent in model.modules()
        for attr, child in parent.named_children()
        if type(child) is nn.MultiheadAttention
    ]
    for parent, attr, child in targets:
        setattr(parent, attr, HookableMultiheadAttention.from_module(child))
    _disable_fused_paths(model)
