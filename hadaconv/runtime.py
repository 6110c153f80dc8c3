"""ONNX Runtime side of hadaconv: the custom-op library and sessions that use it.

The ``com.hadaconv::HadamardAffine`` op lives in a small shared library, ``libhadaconv_ort.so``,
built from the standalone CMake project ``custom_ops/`` (CPU kernel, plus the CUDA kernel when nvcc
is found).  It needs only the ONNX Runtime headers at build time and loads into any onnxruntime
>= 1.21 through ``SessionOptions.register_custom_ops_library``.

* :func:`get_library_path` finds the library: ``$HADACONV_OPS_LIB``, else the copy the wheel
  installs inside the package (``pip install`` builds it), else a development checkout's
  ``custom_ops/build/`` (``hadaconv build-ops`` / ``make ops``).  It never compiles anything;
* :func:`build_ops` runs the CMake configure and build: the explicit developer command;
* :func:`session` opens an ``onnxruntime.InferenceSession``, with the library registered unless
  told otherwise (a portable graph).

onnxruntime is imported lazily, so the rest of hadaconv works without it.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import warnings
from typing import TYPE_CHECKING, Any

from hadaconv.errors import HadaconvError, ModelFormatError, command, option
from hadaconv.progress import status

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

__all__ = ["BFLOAT16_ON_CPU", "LIBRARY_NAME", "OP_DOMAIN", "OP_VERSION", "build_ops", "get_library_path", "session",
           "session_error"]

LIBRARY_NAME = "libhadaconv_ort.so"
#: The op's domain and the newest version of ``HadamardAffine`` the library implements
#: (``GetEndVersion`` in custom_ops/src/hadamard_op.cc; the contract: README, "The op contract stays square").
OP_DOMAIN = "com.hadaconv"
OP_VERSION = 1
# Where the wheel installs the library (CMake's install rule in custom_ops/CMakeLists.txt).
PACKAGE_LIBRARY = pathlib.Path(__file__).resolve().parent / LIBRARY_NAME
# A development checkout: the package folder next to custom_ops/.
OPS_DIR = pathlib.Path(__file__).resolve().parent.parent / "custom_ops"
BUILD_DIR = OPS_DIR / "build"
SANITIZE_BUILD_DIR = OPS_DIR / "build-asan"
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


def build_ops(force: bool = False, cuda: bool | None = None, sanitize: bool = False) -> pathlib.Path:
    """Configure and build ``custom_ops/`` into ``custom_ops/build/``; return the library path.

    ``force`` wipes the build folder first.  ``cuda``: None builds the CUDA kernel when a CUDA
    compiler is found (unless ``$HADACONV_CUDA`` is OFF/0, the switch the wheel build reads too),
    False never, True requires one.  ``sanitize`` builds a CPU-only library
    with AddressSanitizer and UndefinedBehaviorSanitizer into ``custom_ops/build-asan/`` instead
    (for tests; it only loads with libasan preloaded).  The ONNX Runtime headers come from
    ``$ORT_INCLUDE_DIR``, the system include dirs or ``custom_ops/fetch_ort_headers.sh``.  A
    failure raises HadaconvError naming the cause and the log file.  Concurrent callers (two
    test processes) are serialized by a lock file.
    """
    if not (OPS_DIR / "CMakeLists.txt").is_file():
        if PACKAGE_LIBRARY.is_file():  # an installed wheel: built when the wheel was, nothing to do
            raise HadaconvError(f"nothing to build: this installation ships its op library, {PACKAGE_LIBRARY} "
                                "(build-ops rebuilds a source checkout's custom_ops/)")
        raise HadaconvError(
            f"the op library sources are not here ({OPS_DIR}); set HADACONV_OPS_LIB to a built {LIBRARY_NAME}"
        )
    # The `cmake` PyPI package puts it next to the interpreter, which need not be on the PATH.
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(pathlib.Path(sys.executable).parent))
    if cmake is None:
        raise HadaconvError("building the op library needs cmake (>= 3.18) and a C++17 compiler; cmake not found")
    if cuda is None and os.environ.get("HADACONV_CUDA", "").upper() in ("OFF", "0", "FALSE", "NO"):
        cuda = False
    build_dir = SANITIZE_BUILD_DIR if sanitize else BUILD_DIR
    if force and build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = [cmake, "-S", str(OPS_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DHADACONV_CUDA={'OFF' if cuda is False or sanitize else 'ON'}", "-DHADACONV_CUDA_HARNESS=OFF",
                     f"-DHADACONV_SANITIZE={'ON' if sanitize else 'OFF'}"]
        build = [cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]
        what = "the CPU op" if cuda is False or sanitize else \
            "the CPU op, and the CUDA kernel where nvcc is found (--no-cuda or HADACONV_CUDA=OFF skips it)"
        with open(log, "w") as out, status(f"building {what}; log: {log}"):
            for cmd in (configure, build):
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    raise HadaconvError(f"building the op library failed: {_first_error(log)} (log: {log})")
        text = log.read_text(errors="replace")
        if cuda is True and "no CUDA compiler found" in text:
            raise HadaconvError(f"a CUDA build was requested but no CUDA compiler was found (log: {log})")
    lib = build_dir / LIBRARY_NAME
    if not lib.is_file():
        raise HadaconvError(f"the build finished without producing {lib} (log: {log})")
    return lib


def get_library_path() -> str:
    """Absolute path (a str, as ``SessionOptions.register_custom_ops_library`` wants) of
    ``libhadaconv_ort.so``.  Never builds anything.

    Looked up in order: ``$HADACONV_OPS_LIB``; the library installed inside the package (every
    wheel carries it); a development checkout's ``custom_ops/build/`` (``hadaconv build-ops``,
    with a warning when it is older than its sources).  Raises HadaconvError when none exists.
    """
    env = os.environ.get("HADACONV_OPS_LIB")
    if env:
        lib = pathlib.Path(env)
        if not lib.is_file():
            raise HadaconvError(f"HADACONV_OPS_LIB points to {lib}, which does not exist")
        return str(lib.resolve())
    if PACKAGE_LIBRARY.is_file():
        return str(PACKAGE_LIBRARY)
    lib = BUILD_DIR / LIBRARY_NAME
    if lib.is_file():
        if (OPS_DIR / "src").is_dir() and lib.stat().st_mtime < _sources_mtime():
            warnings.warn(f"{lib} is older than its sources in {OPS_DIR}: run `hadaconv build-ops`", stacklevel=2)
        return str(lib)
    where = f"{PACKAGE_LIBRARY.parent}" + (f" or {BUILD_DIR}" if OPS_DIR.is_dir() else "")
    raise HadaconvError(f"the op library {LIBRARY_NAME} is not in {where}: reinstall hadaconv from a wheel, "
                        "run `hadaconv build-ops` in a source checkout, set HADACONV_OPS_LIB, "
                        f"or export with {option('portable', True)}")


#: Why a bfloat16 graph cannot run (nor be validated) on the CPU: said alike by the exporter's
#: refusal and by :func:`session_error`.
BFLOAT16_ON_CPU = "ONNX Runtime's CPU provider has no bfloat16 kernels for standard ops (Mul, MatMul)"


def _holds_bfloat16(model: str | os.PathLike | bytes) -> bool:
    """Whether the graph's inputs, outputs or weights are bfloat16 (False when it cannot be read)."""
    try:
        import onnx

        proto = (onnx.load_from_string(bytes(model)) if isinstance(model, (bytes, bytearray))
                 else onnx.load(os.fspath(model), load_external_data=False))
    except Exception:  # a truncated or missing file: ONNX Runtime's own message says more
        return False
    bf16, graph = onnx.TensorProto.BFLOAT16, proto.graph
    return (any(v.type.tensor_type.elem_type == bf16 for v in (*graph.input, *graph.output))
            or any(t.data_type == bf16 for t in graph.initializer))


def session_error(model: str | os.PathLike | bytes, exc: Exception, providers: list[Any]) -> HadaconvError:
    """The one-line error for a session ONNX Runtime refused to create from ``model`` (a path or
    the serialized bytes) with ``providers``: a bfloat16 graph on the CPU provider alone (ONNX
    Runtime's NOT_IMPLEMENTED: no kernel for a node) and a custom-form graph opened without the
    op library say what to do instead; anything else is a ModelFormatError with ONNX Runtime's
    first line."""
    name = "the serialized model" if isinstance(model, (bytes, bytearray)) else os.fspath(model)
    first = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
    if "NOT_IMPLEMENTED" in first and not any("CUDA" in str(p) for p in providers) and _holds_bfloat16(model):
        return HadaconvError(f"{name} is a bfloat16 graph and {BFLOAT16_ON_CPU}: run it with the CUDA execution "
                             f"provider ({option('provider', 'cuda')}, with onnxruntime-gpu), or export it with "
                             f"{option('dtype', 'float16')} or float32 for the CPU")
    if OP_DOMAIN in first and "is not a registered function/op" in first:  # opened without the op library
        fix = command("its bundle's metadata names none (op_library), so the bundle is damaged: export it again",
                      "open it with library=True (hadaconv.runtime.session's default)")
        return HadaconvError(f"{name} uses {OP_DOMAIN}::HadamardAffine and the session has no op library: {fix}, "
                             f"or export it with {option('portable', True)}")
    return ModelFormatError(f"ONNX Runtime cannot open {name}: {first}")


def import_onnxruntime():
    """The onnxruntime module, or a one-line HadaconvError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - depends on the environment
        raise HadaconvError("onnxruntime is not installed (pip install 'hadaconv[ort]')") from None
    return onnxruntime


def make_session_options(*, config_entries: dict[str, str] | None = None,
                         **session_options: Any) -> "onnxruntime.SessionOptions":
    """``onnxruntime.SessionOptions`` with the given attributes set (an unknown name, or a value of
    the wrong type, is a one-line HadaconvError) and ``config_entries`` added as session config
    entries (for example ``{"session.force_spinning_stop": "1"}``: ONNX Runtime's keys, passed
    through unchecked)."""
    options = import_onnxruntime().SessionOptions()
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    for name, value in session_options.items():
        if not hasattr(options, name):
            hint = " (the execution providers are providers='cpu', 'cuda' or 'auto')" if name == "provider" else ""
            raise HadaconvError(f"onnxruntime.SessionOptions has no option {name!r}{hint}")
        try:
            setattr(options, name, value)
        except TypeError:  # pybind11's multi-line list of the accepted signatures
            raise HadaconvError(f"onnxruntime.SessionOptions.{name} cannot be set to {value!r}: it takes "
                                f"{type(getattr(options, name)).__name__} values") from None
    return options


def _providers(provider: str | list[Any] | None) -> list[Any]:
    """The execution providers a session asks for: "cpu" (the CPU provider alone), "cuda" (CUDA,
    then CPU for the nodes it lacks; a one-line HadaconvError when this onnxruntime has no CUDA
    provider), "auto" or None (CUDA when this onnxruntime has it, else CPU), one of ONNX Runtime's
    provider names, or ONNX Runtime's own list (passed through)."""
    if isinstance(provider, list):
        short = next((p for p in provider if p in ("auto", "cpu", "cuda")), None)
        if short is not None:  # ONNX Runtime would print a banner on stdout and fall back to the CPU
            raise HadaconvError(f"a providers list holds ONNX Runtime's names (CPUExecutionProvider, ...), not "
                                f"{short!r}: give {short!r} alone, not in a list")
        return provider
    available = import_onnxruntime().get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise HadaconvError(f"{option('provider', 'cuda')}: this onnxruntime has no CUDA provider "
                                "(install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider in (None, "auto"):
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    if isinstance(provider, str) and provider.endswith("ExecutionProvider"):
        return [provider]
    raise HadaconvError(f"unknown provider {provider!r}: expected auto, cpu, cuda, an ONNX Runtime provider name "
                        "(CPUExecutionProvider, ...) or a list of those names")


def session(
    model: str | os.PathLike | bytes,
    providers: str | list[Any] | None = "auto",
    *,
    library: str | os.PathLike | bool | None = True,
    **session_options: Any,
) -> "onnxruntime.InferenceSession":
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path or the serialized bytes): the one
    place hadaconv opens a session.

    ``providers``: "auto" (or None: CUDA when this onnxruntime has it, else CPU), "cpu", "cuda"
    (then CPU for what CUDA lacks), an ONNX Runtime provider name, or ONNX Runtime's own list.
    ``library``: True registers this installation's op library (:func:`get_library_path`), a path
    registers that file, False or None none (a portable graph, checked to run without hadaconv).
    Keyword arguments set ``onnxruntime.SessionOptions`` attributes, for example
    ``intra_op_num_threads=1``, and ``config_entries`` ONNX Runtime's session config keys (see
    :func:`make_session_options`).

    Raises (one line each):
        HadaconvError: an unknown option or provider, no CUDA provider for "cuda", no installed op
            library (``library=True``), a bfloat16 graph on the CPU provider (:func:`session_error`).
        ModelFormatError: the op library given by path is missing or does not load; a graph ONNX
            Runtime refuses.
    """
    ort = import_onnxruntime()
    providers = _providers(providers)
    options = make_session_options(**session_options)
    if library is True:
        library = get_library_path()
    if library not in (False, None):
        _register(options, library)
    if not isinstance(model, (bytes, bytearray)):
        model = os.fspath(model)
        if os.path.exists(model) and not os.path.isfile(model):  # a FIFO would block ONNX Runtime's open
            raise ModelFormatError(f"{model} is not a regular file")
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own types: a missing or corrupt file, a node the op refuses
        raise session_error(model, exc, providers) from None


def _register(options: "onnxruntime.SessionOptions", library: str | os.PathLike) -> None:
    if not isinstance(library, (str, os.PathLike)):
        raise HadaconvError(f"library must be True, False or the op library's path, got {type(library).__name__}")
    library = pathlib.Path(library).resolve()  # a bare file name would send the loader to the system's paths
    if not library.is_file():
        raise ModelFormatError(f"the op library {library} does not exist")
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelFormatError(f"cannot load the op library {library}: {str(exc).splitlines()[0]}") from None
