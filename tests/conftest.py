import sys
from pathlib import Path

# tests/tiny_models.py is a helper module, imported by name from the tests.
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Sampled calibration text is cached per test session, never in the user's cache."""
    import os

    old = os.environ.get("HADACONV_CACHE")
    os.environ["HADACONV_CACHE"] = str(tmp_path_factory.mktemp("hadaconv-cache"))
    yield
    if old is None:
        os.environ.pop("HADACONV_CACHE", None)
    else:
        os.environ["HADACONV_CACHE"] = old
