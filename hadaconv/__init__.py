"""hadaconv: replace the dense attention output projections of trained transformers with
fast Walsh-Hadamard projections, and deploy them.

What the CLI's verbs do, from Python: ``convert_file(source, out, ConvertConfig(...))`` (or
``hadaconv.convert.convert(model, tokenizer, cfg)`` in memory, then ``save(model, out)``),
``distill_file(converted, out, DistillConfig(...))`` (or ``hadaconv.distill.distill``),
``export_onnx(model, out)``, ``hadaconv.generate.generate(bundle, prompt)``,
``hadaconv.generate.embed(bundle, texts)`` and ``classify(bundle, texts)`` (``run``),
``hadaconv.evaluate.perplexity(model, text_windows(tokenizer, text, seq_len))`` (``eval``;
``embedding_cosine`` for an encoder), ``hadaconv.sample.sample_texts(model, tokenizer)``
(``sample``), ``inspect_model(source)`` and ``plan_conversion(source, cfg)`` (``inspect``,
``convert --dry-run``); ``load(folder)`` rebuilds a converted folder, ``load_model(path)`` reads a
model of any supported format.

The public names below, and the submodules (``hadaconv.io``, ``hadaconv.ops``, ...), are
imported on first use (PEP 562), not with the package: they pull in torch and transformers
(about 3 s), which ``hadaconv --help`` and the CLI's argument checks do not need.  The torch
custom ops ``torch.ops.hadaconv.*`` are registered when :mod:`hadaconv.ops` is imported (any use
of :func:`load`, :class:`HadamardProjection` or :func:`fwht` does it); code that only loads a
saved ``torch.export`` program should ``import hadaconv.ops`` first.
"""

from importlib import import_module as _import_module
from importlib.util import find_spec as _find_spec

from hadaconv._version import __version__
from hadaconv.errors import HadaconvError

#: Public name -> (module, attribute).  The verbs ``convert`` and ``distill`` stay submodules
#: (hadaconv.convert.convert, hadaconv.distill.distill): a function of the same name here would
#: be replaced by the module the moment it is imported.
_LAZY = {
    "ConvertConfig": ("hadaconv.convert", "ConvertConfig"),
    "convert_file": ("hadaconv.convert", "convert_file"),
    "DistillConfig": ("hadaconv.distill", "DistillConfig"),
    "distill_file": ("hadaconv.distill", "distill_file"),
    "export_onnx": ("hadaconv.export", "export_onnx"),
    "factorize": ("hadaconv.hadamard", "factorize"),
    "fwht": ("hadaconv.ops", "fwht"),
    "get_library_path": ("hadaconv.runtime", "get_library_path"),
    "hadamard_affine": ("hadaconv.ops", "hadamard_affine"),
    "hadamard_matrix": ("hadaconv.hadamard", "hadamard_matrix"),
    "HadamardProjection": ("hadaconv.nn", "HadamardProjection"),
    "inspect_model": ("hadaconv.plan", "inspect_model"),
    "load": ("hadaconv.io", "load"),
    "load_model": ("hadaconv.io", "load_model"),
    "patch": ("hadaconv.swap", "patch"),
    "plan_conversion": ("hadaconv.plan", "plan_conversion"),
    "save": ("hadaconv.io", "save"),
}

__all__ = ["HadaconvError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        if not name.startswith("_") and _find_spec(f"hadaconv.{name}") is not None:
            return _import_module(f"hadaconv.{name}")  # a submodule, as after ``import hadaconv.<name>``
        raise AttributeError(f"module 'hadaconv' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(_import_module(module), attr)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
