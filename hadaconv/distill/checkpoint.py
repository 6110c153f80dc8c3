"""Checkpoints that let a distillation run continue exactly where it stopped.

A checkpoint (``DIR/last.pt``, written atomically by rank 0) holds the trainable parameters (the
frozen ones are reloaded from the converted folder), the optimizer state, the step / token /
time counters (the learning-rate schedule and the data position are functions of them), the RNG
states, the best state seen so far and the run's record (curve, metrics).  The trainable and
optimizer states go through :mod:`torch.distributed.checkpoint.state_dict`, so the same code
serves one process, DDP and FSDP2 (full state dicts, gathered to rank 0).  Only tensors and plain
Python values are stored, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hadaconv.atomic import atomic_file
from hadaconv.errors import HadaconvError, option

__all__ = ["check_settings", "checkpoint_step", "load_checkpoint", "restore_trainable", "save_checkpoint",
           "trainable_state"]

FILE = "last.pt"
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters (on CPU; complete on rank 0 under FSDP)."""
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=_GATHER).items()}


def restore_trainable(model: nn.Module, state: dict[str, torch.Tensor], *, from_rank0: bool = False) -> None:
    """Load trainable parameters saved by :func:`trainable_state` (frozen ones untouched)."""
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, state, options=options)


def _rng() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, counters: dict,
                    record: dict, best: dict | None, fingerprint: dict, main: bool) -> None:
    """Write ``folder/last.pt`` (rank 0 writes; every rank takes part in gathering)."""
    payload = {
        "trainable": trainable_state(model),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_GATHER),
        "counters": dict(counters),
        "rng": _rng(),
        "best": best,
        "record": json.dumps(record),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    if not main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / FILE) as tmp:  # a crash mid-write never leaves a torn checkpoint
        torch.save(payload, tmp)


def _read(path: Path, *, mmap: bool = False) -> Any:
    if not zipfile.is_zipfile(path):  # what torch.save writes; mmap would answer with advice on saving
        raise HadaconvError(f"the checkpoint {path} is not one hadaconv wrote (not a torch.save archive): remove it "
                            "to start again")
    try:  # mmap: the tensors stay on disk (a 2.3 GB checkpoint read for its settings alone)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a torn or foreign file: say which, in one line
        raise HadaconvError(f"cannot read the checkpoint {path}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return f"{(str(exc).splitlines() or [type(exc).__name__])[0]:.120}"


def _damaged(path: Path, exc: Exception) -> HadaconvError:
    return HadaconvError(f"the checkpoint {path} is damaged ({type(exc).__name__}: {_first_line(exc)}): remove it "
                         "to start again")


def check_settings(folder: Path, fingerprint: dict, flags: dict[str, str] | None = None) -> None:
    """Refuse, before the models load, a checkpoint in ``folder`` of a run with other settings
    than ``fingerprint`` (:meth:`DistillConfig.fingerprint`; an ``lr`` of None, derived from the
    model after the load, is compared when the run resumes).  No checkpoint: nothing to check."""
    path = folder / FILE
    if not path.is_file():
        return
    payload = _read(path, mmap=True)
    try:
        saved = json.loads(payload["fingerprint"])
        if not isinstance(saved, dict):
            raise ValueError(f"settings {str(saved):.60}")
    except Exception as exc:  # noqa: BLE001 - readable, but not what save_checkpoint writes
        raise _damaged(path, exc) from None
    known = {k: v for k, v in fingerprint.items() if not (k == "lr" and v is None)}
    _compare({k: saved.get(k) for k in known}, known, folder, flags or {})


def checkpoint_step(path: Path) -> int | None:
    """The step the checkpoint ``path`` was written at; None where it cannot be read."""
    try:
        step = _read(path, mmap=True)["counters"]["step"]
    except Exception:  # noqa: BLE001 - only for a message: the resume reads it again, and says why
        return None
    return step if isinstance(step, int) else None


def _compare(saved: dict, fingerprint: dict, folder: Path, flags: dict[str, str]) -> None:
    if saved.get("selected_by") != fingerprint.get("selected_by"):
        raise HadaconvError(f"the checkpoint in {folder} comes from an older hadaconv, which chose the state to keep "
                            "by perplexity: remove it to start again")
    if saved != fingerprint:
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        shown = {k: _shown(saved.get(k), fingerprint.get(k)) for k in diff}
        settings = ", ".join(f"{option(k, flag=flags.get(k))}: {there} there, {here} here"
                             for k, (there, here) in shown.items())
        raise HadaconvError(f"the checkpoint in {folder} comes from a run with other settings ({settings}); remove "
                            "it or give its settings")


def _shown(*values: Any) -> list[str]:
    """Settings as the message shows them: 3.33333e-05, not 3.3333333333333335e-05, unless
    that would show two different values alike."""
    def full(v: Any) -> str:
        return "the default" if v is None else repr(v)  # data None: the model's own sampled text

    short = [f"{v:.6g}" if isinstance(v, float) else full(v) for v in values]
    return short if len(set(short)) == len(short) else [full(v) for v in values]


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict, flags: dict[str, str] | None = None) -> dict | None:
    """Restore model, optimizer and RNG from ``folder/last.pt``; returns the rest (counters,
    record, best) or None when there is no checkpoint.  A checkpoint of a run with other
    settings (learning rate, batch, data, trainable set, ...) is refused, each setting named as
    the caller names it (``flags``: command-line spellings that are not ``--`` + the name)."""
    path = folder / FILE
    if not path.is_file():
        return None
    payload = _read(path)
    try:
        return _restore(payload, folder, model=model, optimizer=optimizer, fingerprint=fingerprint,
                        flags=flags or {})
    except HadaconvError:
        raise
    except Exception as exc:  # noqa: BLE001 - readable, but not what save_checkpoint writes
        raise _damaged(path, exc) from None


def _restore(payload: Any, folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             fingerprint: dict, flags: dict[str, str]) -> dict:
    _compare(json.loads(payload["fingerprint"]), fingerprint, folder, flags)
    counters = payload["counters"]
    if not all(isinstance(counters.get(k), (int, float)) for k in ("step", "tokens", "elapsed", "best_loss")):
        raise ValueError(f"counters {str(counters):.60}")
    restore_trainable(model, payload["trainable"])
    options = StateDictOptions(full_state_dict=True, strict=False)
    # The saved param groups carry the update's implementation too: keep this run's (a checkpoint
    # of a version before the fused AdamW would otherwise resume on the slower per-tensor loop).
    implementation = [{k: group.get(k) for k in ("fused", "foreach")} for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=options)
    for group, kept in zip(optimizer.param_groups, implementation):
        group.update(kept)
    torch.set_rng_state(payload["rng"]["cpu"])
    if "cuda" in payload["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return {"counters": payload["counters"], "record": json.loads(payload["record"]), "best": payload["best"]}
