"""What a conversion would do, before it runs: the attention layers it would take, their Hadamard
factorization and the parameters it would remove (``hadaconv inspect``, ``hadaconv convert
--dry-run``), and for a conversion, what it would calibrate on and what it would warn about.

The shapes come from the model's config where it has one (:func:`hadaconv.io.skeleton`:
SmolLM2's GGUF in 17 s where its load took 50 s, Qwen2.5-0.5B's folder in 11 s where it took
26 s, benchmarks/RESULTS.md); converted folders, pickled modules and adapters that need real
weights are loaded in full.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

from torch import nn

from hadaconv.adapters import Adapter, AttentionLayer, check_block, find_adapter, model_kind, target_overrides
from hadaconv.calibrate import HELDOUT_EVERY, count_windows_early
from hadaconv.convert import (ConvertConfig, check_against_model, check_config, check_convert_output, chooses_nothing,
                              default_block, dense_layers, find_target, probe_windows)
from hadaconv.hadamard import factorize
from hadaconv.nn import HadamardProjection, check_saves, parameters_saved
from hadaconv.report import calibration_warning, max_layers_warning, ranking_warning
from hadaconv.sample import cached_sequences, describe_calibration

__all__ = ["Plan", "PlannedLayer", "inspect_model", "plan_conversion"]


@dataclass(frozen=True)
class PlannedLayer:
    """One dense attention block.  ``factorization`` is the Hadamard order's construction (e.g.
    ``36 x 2^4 (paley2(17))``, or ``unsupported (...)``); ``removable`` the parameters its
    conversion removes at the plan's block and rank (0 where it would remove none, or the block
    does not divide the width)."""

    index: int
    name: str  # the output projection's module name
    out_features: int
    in_features: int
    factorization: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_folded: bool  # a value projection that the head-wise map folds into
    removable: int
    dense_bias: bool = False  # the dense projection has a bias (which beta replaces)


@dataclass
class Plan:
    """The layers a conversion would take and what it would remove.  ``from_config``: the shapes
    were read from the config alone (no weight read, so damaged weights show only on the load);
    ``calibration`` is a conversion's (:func:`plan_conversion`), None for :func:`inspect_model`;
    ``warnings`` are a conversion's, and for both a ``--target`` that replaces the model's own
    adapter (:func:`hadaconv.adapters.target_overrides`)."""

    source: str
    adapter: str
    kind: str  # "causal-lm", "encoder", ...
    parameters: int  # of the whole model
    blocks: int  # attention blocks in the model, converted ones included
    converted: int  # attention blocks converted already (a converted folder), not listed
    block: int
    rank: int
    layers: list[PlannedLayer]  # the candidates (every dense block for inspect_model)
    from_config: bool
    calibration: str | None = None
    warnings: list[str] = field(default_factory=list)
    max_layers: int | None = None  # the run converts the K least sensitive candidates
    max_loss: float | None = None  # the run converts the least sensitive while their summed KL stays <= E
    rotation_params: int = 0  # parameters the residual stream's rotation adds (a tied head's final-norm map)
    rotate_skipped: str = ""  # why the run would not rotate the stream, asked to ("": it would, or was not asked)

    @property
    def removable(self) -> int:
        """Parameters the conversion of every listed layer would remove."""
        return sum(layer.removable for layer in self.layers)

    @property
    def removed_at_most(self) -> int:
        """Parameters the run removes at most: with ``max_layers``, those of the K layers that
        remove most (the run ranks them), else every listed layer's."""
        k = len(self.layers) if self.max_layers is None else self.max_layers
        return sum(sorted((layer.removable for layer in self.layers), reverse=True)[:k])

    @property
    def net_removed(self) -> int:
        """What the model loses at most, all told: :attr:`removed_at_most` less what the
        residual stream's rotation adds (:attr:`rotation_params`)."""
        return self.removed_at_most - self.rotation_params

    def to_dict(self) -> dict:
        """The plan as JSON-ready values, ``removable``, ``removed_at_most`` and ``net_removed`` included."""
        return asdict(self) | {"removable": self.removable, "removed_at_most": self.removed_at_most,
                               "net_removed": self.net_removed}


def inspect_model(source: str | os.PathLike, *, block: int | None = None, rank: int = 0,
                  model_config: str | os.PathLike | None = None, target: str | None = None,
                  trust_pickle: bool = False) -> Plan:
    """Every dense attention block of the model at ``source`` (any input
    :func:`hadaconv.io.load_model` reads) and the parameters converting it at ``block`` (default:
    as ``convert``'s) and ``rank`` would remove; what ``hadaconv inspect`` prints.

    Raises:
        InputError: a ``block`` that does not divide a layer's output width, or a ``block`` or
            ``rank`` at which a layer would keep as many parameters as its dense projection.
        HadaconvError: the model cannot be read, or has no attention block (a converted folder's
            converted ones count: with every one converted the plan lists none).
    """
    from hadaconv.io import check_model_config

    check_model_config(source, model_config)  # before the skeleton, which would ignore an inapplicable one
    plan = _plan(source, model_config, trust_pickle, target, _all_dense, block, rank)
    if block is not None or rank:  # asked for: refused as convert refuses it, not shown as rows of 0
        for layer in plan.layers:
            check_block(plan.block, layer.out_features, layer.name, in_features=layer.in_features,
                        bias=layer.dense_bias)
            check_saves(layer.name, layer.in_features, layer.out_features, layer.dense_bias, plan.block, rank,
                        block_given=block is not None)
    return plan


def plan_conversion(source: str | os.PathLike, config: ConvertConfig | None = None, *,
                    model_config: str | os.PathLike | None = None, target: str | None = None,
                    trust_pickle: bool = False, streamed: bool = False, output: str | os.PathLike | None = None,
                    overwrite: bool = False, dtype: str = "auto", device: str | None = None) -> Plan:
    """What :func:`hadaconv.convert.convert_file` (``streamed``:
    :func:`hadaconv.stream.convert_streamed`) would convert with ``config``, after the checks it
    makes before its model load (the options, the calibration files read, ``--layers``,
    ``--block``, ``--rank`` and ``--seq-len`` against the model's config); what ``hadaconv
    convert --dry-run`` prints.  ``output`` (and ``overwrite``): the folder the run would write,
    checked as the run checks it.  Among the candidates, a ranked run (``max_layers``) converts
    the least sensitive, which only the run measures.  The calibration line says how much of the
    sampled text is cached where an earlier run read the same files in the same ``dtype`` onto
    the same kind of ``device`` (see :func:`hadaconv.device.resolve_device`).

    Raises:
        InputError: an option out of range, or one that does not fit the model.
        OutputError: ``output`` is a folder the run would refuse to write.
        HadaconvError: a calibration source missing or unreadable, sampled text asked of a model
            that cannot write it; the model cannot be read.
    """
    from hadaconv.device import resolve_device
    from hadaconv.io import check_model_config, source_key

    cfg = check_config(config)
    if streamed:
        from hadaconv.stream import check_request

        check_request(source, cfg)
    if output is not None:
        check_convert_output(source, output, cfg, overwrite=overwrite, model_config=model_config)
    check_model_config(source, model_config)  # before the options are checked against a config it would ignore
    check_against_model(str(source), cfg, model_config, target)

    def candidates(model: nn.Module, adapter: Adapter) -> list[AttentionLayer]:
        return find_target(model, cfg, adapter).layers

    from hadaconv.rotation import NOT_DATA_FREE, NOT_STREAMED, costs_more

    skip = (NOT_STREAMED if streamed else NOT_DATA_FREE if cfg.calib == "none" else "") if cfg.rotate else ""
    plan = _plan(source, model_config, trust_pickle, target, candidates, cfg.block, cfg.rank, cfg.mode,
                 rotate=cfg.rotate)
    if skip and not plan.rotate_skipped:  # the model's own reason first: dropping an option would not help
        plan.rotate_skipped, plan.rotation_params = skip, 0
    key = source_key(source, config=model_config, dtype="auto" if streamed else dtype,
                     device=resolve_device(device).type)
    cached = cached_sequences(key, samples=cfg.samples, seq_len=cfg.seq_len)
    plan.calibration = describe_calibration(cfg.calib, plan.kind, samples=cfg.samples, seq_len=cfg.seq_len,
                                            cached_only=streamed, cached=cached)
    plan.max_layers, plan.max_loss = cfg.max_layers, cfg.max_loss
    if plan.rotation_params:  # as the run decides, on the most its layers can remove
        k = min(len(plan.layers), plan.max_layers or len(plan.layers))
        if why := costs_more(plan.rotation_params, plan.removed_at_most, k):
            plan.rotate_skipped, plan.rotation_params = why, 0
    plan.warnings += _warnings(source, cfg, model_config, len(plan.layers))
    return plan


def _warnings(source: str | os.PathLike, cfg: ConvertConfig, model_config, candidates: int) -> list[str]:
    """What the run would warn of, as far as the files tell before the load: a text too short
    for ``--samples`` (counted), a ranking on few held-out windows, a ``--max-layers`` that
    chooses nothing."""
    counted = count_windows_early(source, cfg.calib, samples=cfg.samples, seq_len=cfg.seq_len, config=model_config)
    made = counted[0] if counted else cfg.samples  # sampled text makes about as many as asked
    held = made // HELDOUT_EVERY
    ranks = cfg.ranked and not chooses_nothing(cfg, candidates)
    ranked_on = probe_windows(cfg, held) if ranks else 0
    said = [calibration_warning(cfg.samples, *counted) if counted else None,
            ranking_warning(ranked_on, max(0, ranked_on - held), cfg.samples, made),
            max_layers_warning(cfg.max_layers, candidates) if chooses_nothing(cfg, candidates) else None]
    return [w for w in said if w]


#: The layers a plan lists, from the model and its adapter.
Select = Callable[[nn.Module, Adapter], list[AttentionLayer]]
#: Every dense layer; none (not an error) for a wholly converted folder, which ``inspect`` lists too.
_all_dense: Select = partial(dense_layers, none_left_ok=True)


def _plan(source: str | os.PathLike, model_config, trust_pickle: bool, target: str | None, select: Select,
          block: int | None, rank: int, mode: str = "head", *, rotate: bool = False) -> Plan:
    """The plan on the model's skeleton where its config builds one, else on the loaded model;
    ``select(model, adapter)`` gives the layers; ``mode``: the fit's (for the --target warning);
    ``rotate``: the run rotates the residual stream where the model allows it."""
    from hadaconv.io import load_model, skeleton

    empty = skeleton(source, config=model_config)
    if empty is not None:
        try:
            return _layers_plan(empty, str(source), target, select, block, rank, mode, from_config=True,
                                rotate=rotate)
        except (NotImplementedError, RuntimeError, TypeError):  # what meta tensors raise when read
            pass  # an adapter that reads weight values; a bug would raise again on the loaded model
    loaded = load_model(source, config=model_config, trust_pickle=trust_pickle)
    return _layers_plan(loaded.model, loaded.source, target, select, block, rank, mode, from_config=False,
                        rotate=rotate)


def _layers_plan(model: nn.Module, source: str, target: str | None, select: Select, block: int | None,
                 rank: int, mode: str, *, from_config: bool, rotate: bool = False) -> Plan:
    adapter = find_adapter(model, target=target)
    layers = select(model, adapter)
    block = block or default_block([layer.out_features for layer in layers])
    converted = sum(isinstance(m, HadamardProjection) for m in model.modules())
    overrides = target_overrides(model, target, mode=mode)
    return Plan(source=source, adapter=adapter.name, kind=model_kind(model),
                parameters=sum(p.numel() for p in model.parameters()),
                blocks=len(_all_dense(model, adapter)) + converted, converted=converted, block=block, rank=rank,
                layers=[_planned(layer, block, rank) for layer in layers], from_config=from_config,
                warnings=[overrides] if overrides else [],
                **(_rotation(model, adapter) if rotate else {}))


def _rotation(model: nn.Module, adapter: Adapter) -> dict:
    """The plan's fields for a run that rotates the residual stream (:mod:`hadaconv.rotation`):
    ``rotation_params``, what the rotation adds (the final norm's d x d map where the head is
    tied to the embedding, else 0), or ``rotate_skipped``, why the model cannot be rotated."""
    from hadaconv.rotation import added_parameters, why_not_rotatable

    stream = adapter.residual_stream
    why = why_not_rotatable(model, stream, adapter.name)
    return {"rotate_skipped": why} if why else {"rotation_params": added_parameters(model, stream)}


def _planned(layer: AttentionLayer, block: int, rank: int) -> PlannedLayer:
    w, b = layer.out.get()
    try:
        fac, fits = str(factorize(max(w.shape))).split(" = ")[-1], w.shape[0] % block == 0
    except Exception as e:  # noqa: BLE001 - shown in the plan, not raised
        fac, fits = f"unsupported ({e.__class__.__name__})", False
    removable = max(0, parameters_saved(w.shape[1], w.shape[0], block, b is not None, rank)) if fits else 0
    return PlannedLayer(index=layer.index, name=layer.out_name, out_features=w.shape[0], in_features=w.shape[1],
                        factorization=fac, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
                        head_dim=layer.head_dim, value_folded=layer.value is not None, removable=removable,
                        dense_bias=b is not None)
