"""The package's lazy imports (PEP 562, hadaconv/__init__.py), in a fresh interpreter each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_is_light_and_names_resolve():
    r = _run("import sys, hadaconv\n"
             "assert 'torch' not in sys.modules, 'import hadaconv pulled in torch'\n"
             "for name in hadaconv.__all__: getattr(hadaconv, name)\n"
             "assert set(hadaconv.__all__) <= set(dir(hadaconv))\n"
             "assert 'import_module' not in dir(hadaconv)")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["io", "ops", "convert", "export"])
def test_submodules_are_attributes(name):
    """``hadaconv.io`` and the like work after a plain ``import hadaconv``, as they did when the
    package imported them eagerly; ``hadaconv.ops`` registers the torch custom ops."""
    r = _run(f"import hadaconv\nassert hadaconv.{name}.__name__ == 'hadaconv.{name}'\n"
             "import torch\n"
             f"{'torch.ops.hadaconv.fwht' if name == 'ops' else 'pass'}\n"
             "try:\n    hadaconv.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)")
    assert r.returncode == 0, r.stderr


def test_cli_module_leaves_torch_unloaded():
    """The console entry point's module imports no torch, so :func:`hadaconv.cli.main` sets
    GOMP_SPINCOUNT before libgomp loads and reads it."""
    r = _run("import sys, hadaconv.cli\nassert 'torch' not in sys.modules, 'hadaconv.cli pulled in torch'")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("env, expect", [
    ({}, "10000"),
    ({"GOMP_SPINCOUNT": "INFINITE"}, "INFINITE"),  # the user's own choice stays
    ({"OMP_WAIT_POLICY": "ACTIVE"}, None),  # so does a wait policy, which the spin count would override
])
def test_cli_sets_the_spin_count_unless_the_user_did(monkeypatch, env, expect):
    from hadaconv.cli import main

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # recorded, so that what main sets is undone after the test
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    assert os.environ.get("GOMP_SPINCOUNT") == expect


@pytest.mark.parametrize("verb, config", [("convert", "ConvertConfig"), ("distill", "DistillConfig")])
def test_cli_defaults_are_the_config_defaults(verb, config):
    """The CLI spells its defaults out (it imports no torch, so not the configs), and `--help`
    shows them: each must be the Python API's own, or the two entry points convert differently."""
    import dataclasses
    import importlib

    import click

    from hadaconv.cli import cli

    fields = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(f"hadaconv.{verb}"), config))}
    unset = getattr(click.core, "UNSET", object())  # click 8.3's mark of "no default"; older versions say None
    shared = [p for p in cli.commands[verb].params
              if p.name in fields and p.default is not unset and not getattr(p, "multiple", False)]
    assert len(shared) >= 7
    assert {p.name: p.default for p in shared} == {p.name: fields[p.name] for p in shared}


def test_sample_defaults_are_sample_texts_defaults():
    """`hadaconv sample` writes the text a default convert calibrates on: its spelled-out
    defaults must be :func:`hadaconv.sample.sample_texts`'s, whose count is the convert default."""
    import inspect

    from hadaconv.cli import cli
    from hadaconv.convert import DEFAULT_CALIBRATION
    from hadaconv.sample import sample_texts

    own = {n: p.default for n, p in inspect.signature(sample_texts).parameters.items()
           if p.default is not inspect.Parameter.empty}
    given = {p.name: p.default for p in cli.commands["sample"].params if p.name in own}
    assert set(given) == {"samples", "seq_len", "batch_size", "temperature", "seed"}
    assert given == {name: own[name] for name in given}
    assert own["samples"] == DEFAULT_CALIBRATION
