"""ONNX Runtime side of hadaconv: the custom-op library and sessions that use it.

The ``com.hadaconv::HadamardAffine`` op lives in a small shared library, ``libhadaconv_ort.so``,
built from the repository's standalone CMake project ``custom_ops/`` (CPU kernel, plus the CUDA
kernel when nvcc is found).  It needs only the ONNX Runtime headers at build time and loads into
any onnxruntime >= 1.21 through ``SessionOptions.register_custom_ops_library``.

* :func:`op_library` finds the library (``$HADACONV_OPS_LIB`` wins), building it when missing or
  older than its sources;
* :func:`build_ops` runs the CMake configure and build;
* :func:`session` opens an ``onnxruntime.InferenceSession`` with the library registered.

onnxruntime is imported lazily, so the rest of hadaconv works without it.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from hadaconv.errors import HadaconvError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

__all__ = ["LIBRARY_NAME", "build_ops", "op_library", "session"]

LIBRARY_NAME = "libhadaconv_ort.so"
OPS_DIR = pathlib.Path(__file__).resolve().parent.parent / "custom_ops"
BUILD_DIR = OPS_DIR / "build"
_SOURCES = ("CMakeLists.txt", "exports.map", "src")


def _sources_mtime() -> float:
    """Newest modification time among the files that make up the library."""
    newest = 0.0
    for name in _SOURCES:
        path = OPS_DIR / name
        files = path.rglob("*") if path.is_dir() else [path]
        newest = max([newest] + [f.stat().st_mtime for f in files if f.is_file()])
    return newest


def _first_error(log: pathlib.Path) -> str:
    """The most telling part of a build log: the first line reporting an error, with CMake's
    indented continuation lines (the actual reason) folded in."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for i, line in enumerate(lines):
        low = line.lower()
        if "error" in low and "-werror" not in low:
            parts = [line.strip()]
            for nxt in lines[i + 1 : i + 6]:
                if nxt.strip() and not nxt.startswith("  "):
                    break
                if nxt.strip():
                    parts.append(nxt.strip())
            return " ".join(parts)[:400]
    return next((ln.strip()[:400] for ln in reversed(lines) if ln.strip()), "no output")


def build_ops(force: bool = False, cuda: bool | None = None) -> pathlib.Path:
    """Configure and build ``custom_ops/`` into ``custom_ops/build/``; return the library path.

    ``force`` wipes the build folder first.  ``cuda``: None builds the CUDA kernel when a CUDA
    compiler is found, False never, True requires one.  The ONNX Runtime headers come from
    ``$ORT_INCLUDE_DIR``, the system include dirs or ``custom_ops/fetch_ort_headers.sh``.  A
    failure raises HadaconvError naming the cause and the log file.  Concurrent callers (two
    test processes) are serialized by a lock file.
    """
    if not (OPS_DIR / "CMakeLists.txt").is_file():
        raise HadaconvError(
            f"the op library sources are not here ({OPS_DIR}); set HADACONV_OPS_LIB to a built {LIBRARY_NAME}"
        )
    cmake = shutil.which("cmake")
    if cmake is None:
        raise HadaconvError("building the op library needs cmake (>= 3.18) and a C++17 compiler; cmake not found")
    if force and BUILD_DIR.exists():
        shutil.rmtree(BUILD_DIR)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    log = BUILD_DIR / "build.log"
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = [cmake, "-S", str(OPS_DIR), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DHADACONV_CUDA={'OFF' if cuda is False else 'ON'}", "-DHADACONV_CUDA_HARNESS=OFF"]
        build = [cmake, "--build", str(BUILD_DIR), "-j", str(os.cpu_count() or 2)]
        with open(log, "w") as out:
            for cmd in (configure, build):
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    raise HadaconvError(f"building the op library failed: {_first_error(log)} (log: {log})")
        text = log.read_text(errors="replace")
        if cuda is True and "no CUDA compiler found" in text:
            raise HadaconvError(f"a CUDA build was requested but no CUDA compiler was found (log: {log})")
    lib = BUILD_DIR / LIBRARY_NAME
    if not lib.is_file():
        raise HadaconvError(f"the build finished without producing {lib} (log: {log})")
    return lib


def op_library(build: bool = True) -> pathlib.Path:
    """Path of ``libhadaconv_ort.so``.

    ``$HADACONV_OPS_LIB`` wins when set.  Otherwise the library built from the repository's
    ``custom_ops/``, (re)built with :func:`build_ops` when missing or older than its sources
    (with ``build=False`` a missing library is an error and a stale one is used as it is).
    """
    env = os.environ.get("HADACONV_OPS_LIB")
    if env:
        lib = pathlib.Path(env)
        if not lib.is_file():
            raise HadaconvError(f"HADACONV_OPS_LIB points to {lib}, which does not exist")
        return lib
    lib = BUILD_DIR / LIBRARY_NAME
    fresh = lib.is_file() and (not (OPS_DIR / "src").is_dir() or lib.stat().st_mtime >= _sources_mtime())
    if fresh or (lib.is_file() and not build):
        return lib
    if not build:
        raise HadaconvError(f"{lib} is not built; run `hadaconv build-ops` or set HADACONV_OPS_LIB")
    return build_ops()


def import_onnxruntime():
    """The onnxruntime module, or a one-line HadaconvError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - depends on the environment
        raise HadaconvError("onnxruntime is not installed (pip install 'hadaconv[ort]')") from None
    return onnxruntime


def make_session_options(**session_options: Any) -> "onnxruntime.SessionOptions":
    """``onnxruntime.SessionOptions`` with the given attributes set (an unknown name is a
    one-line HadaconvError)."""
    options = import_onnxruntime().SessionOptions()
    for name, value in session_options.items():
        if not hasattr(options, name):
            raise HadaconvError(f"onnxruntime.SessionOptions has no option {name!r}")
        setattr(options, name, value)
    return options


def session(
    model: str | os.PathLike | bytes,
    providers: list[Any] | None = None,
    **session_options: Any,
) -> "onnxruntime.InferenceSession":
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path or the serialized bytes) with
    the op library registered.

    ``providers`` defaults to CUDA (then CPU) when this onnxruntime has the CUDA provider, else
    CPU.  Keyword arguments set ``onnxruntime.SessionOptions`` attributes, for example
    ``intra_op_num_threads=1`` or ``graph_optimization_level=...``.
    """
    ort = import_onnxruntime()
    options = make_session_options(**session_options)
    options.register_custom_ops_library(str(op_library()))
    if providers is None:
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
    if not isinstance(model, (bytes, bytearray)):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=options, providers=providers)
