"""Optimum as a client: today no optimum-onnx release works with our transformers.

optimum-onnx 0.1.0 (the newest release, 2026-11) requires ``transformers<4.58`` and optimum~=2.1;
under our transformers 5.x pip refuses to install it (ResolutionImpossible), and forced in with
``--no-deps`` ``from optimum.onnxruntime import ORTModelForCausalLM`` fails on an import that
transformers 5 removed (``transformers.modeling_utils.get_parameter_dtype``).  This test pins that:
it skips where optimum-onnx is not installed (the dev environment: it cannot be installed with our
pins) and fails once a release accepts our transformers, the moment to replace it with a
generation-equality test (ORTModelForCausalLM.from_pretrained(bundle, session_options=... with
hadaconv.get_library_path() registered)).
"""

from importlib.metadata import PackageNotFoundError, distribution

import pytest


def test_optimum_onnx_cannot_run_under_our_transformers():
    import transformers
    from packaging.requirements import Requirement

    try:
        dist = distribution("optimum-onnx")
    except PackageNotFoundError:
        pytest.skip("optimum-onnx is not installed: no release installs with transformers 5.x "
                    "(each requires transformers<4.58); see README, 'Optimum'")
    pins = [Requirement(r) for r in dist.requires or [] if Requirement(r).name == "transformers"]
    ours = transformers.__version__
    assert pins and not all(p.specifier.contains(ours) for p in pins), (
        f"optimum-onnx {dist.version} accepts transformers {ours}: test generation equality instead")
    with pytest.raises(ImportError, match="get_parameter_dtype"):
        from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
