#!/usr/bin/env bash
# Build the wheel once, install it into a throwaway virtualenv and run .ci/wheel_check.py from
# outside the repository with nothing but that virtualenv on the PATH (no compiler, no CMake, no
# apt): what `pip install hadaconv[ort]` gives a user.
#
# Usage: .ci/wheel_check.sh PYTHON    (the dev virtualenv's python: it builds the wheel, with
#                                      --no-build-isolation since scikit-build-core is in it)
#
# HADACONV_CUDA defaults to OFF here: the check runs the CPU op and the CUDA compile would add
# about 2 minutes.  WHEEL_CHECK_DEPS picks how the wheel's dependencies arrive:
#   dev (default)  the wheel alone (--no-deps); torch, onnx, onnxruntime, ... are read from the
#                  dev virtualenv through a .pth line, and wheel_check.py confirms they satisfy
#                  the wheel's declared requirements.  Seconds.
#   install        a full `pip install hadaconv[ort]` under constraints.txt (torch 2.13.0 CPU from
#                  the wheel on the machine's disk, the rest from pip's cache or the index); about
#                  2 minutes more on the 2-core machine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$1"
deps="${WHEEL_CHECK_DEPS:-dev}"
start=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; return 1; }; }

HADACONV_CUDA="${HADACONV_CUDA:-OFF}" quiet "$py" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/hadaconv-*.whl)"
"$py" -c "import sys, zipfile; sys.exit('hadaconv/libhadaconv_ort.so' not in zipfile.ZipFile(sys.argv[1]).namelist())" "$wheel" \
    || { echo "wheel_check: $(basename "$wheel") has no op library" >&2; exit 1; }
built=$SECONDS

"$py" -m venv --without-pip "$work/venv"
vpy="$work/venv/bin/python"
pipv=("$py" -m pip --python "$vpy" --disable-pip-version-check)
case "$deps" in
  dev)
    "$vpy" -c "import site; print(site.getsitepackages()[0])" >/dev/null
    "$py" -c "import site; print(site.getsitepackages()[0])" \
        > "$("$vpy" -c "import site; print(site.getsitepackages()[0])")/_dev_deps.pth"
    quiet "${pipv[@]}" install --no-deps --no-index "$wheel" ;;
  install)
    quiet "${pipv[@]}" install -c "$repo/constraints.txt" "$wheel[ort]" ;;
  *) echo "wheel_check: WHEEL_CHECK_DEPS must be dev or install" >&2; exit 2 ;;
esac
installed=$SECONDS

(cd "$work" && env -i HOME="$work" PATH="$work/venv/bin" OMP_NUM_THREADS=1 "$vpy" "$repo/.ci/wheel_check.py" "$repo")
echo "wheel_check: $(basename "$wheel"): build $((built - start)) s, install ($deps) $((installed - built)) s, check $((SECONDS - installed)) s"
