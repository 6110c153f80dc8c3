#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers (Debian 13 "trixie" libonnxruntime-dev, ORT 1.21) into
# custom_ops/third_party/onnxruntime/include.
#
# Why this way: the PyPI onnxruntime wheels ship no headers, and nothing may be vendored.  The
# Debian package is signed, small and reachable through the machine's own package mirror.  The
# host's apt state is never touched: a private state/cache/sources tree in a temp dir holds the
# trixie index, and only the headers are kept.  The mirror URI is read from the host's apt
# configuration at run time, so no host name is written in this repository.
#
# Usage: fetch_ort_headers.sh [DEST]   (DEST defaults to custom_ops/third_party/onnxruntime)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/third_party/onnxruntime}"
suite="${HADACONV_ORT_SUITE:-trixie}"
keyring="${HADACONV_ORT_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"

if [[ -f "$dest/include/onnxruntime_c_api.h" ]]; then
    echo "$dest/include"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "fetch_ort_headers: $tool not found (Debian/Ubuntu apt needed, or set ORT_INCLUDE_DIR)" >&2; exit 1; }
done

# The first non-security Debian mirror of the host: deb822 files first, then the one-line format.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    mirror="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")"
    [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -r /etc/apt/sources.list ]]; then
    mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($i !~ /security/) { print $i; exit } ; break } }' /etc/apt/sources.list)"
fi
[[ -n "$mirror" ]] || { echo "fetch_ort_headers: no Debian mirror found in the host apt configuration" >&2; exit 1; }

# The archive keyring of Debian 12 already carries trixie's signing keys (the package
# debian-archive-keyring ships the next release's keys), so the index is verified as usual;
# without a keyring that knows trixie, the update below fails rather than trust unsigned data.
[[ -r "$keyring" ]] || { echo "fetch_ort_headers: keyring $keyring not found (set HADACONV_ORT_KEYRING)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/state/lists/partial" "$tmp/cache/archives/partial" "$tmp/sources.list.d" "$tmp/deb"
printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" > "$tmp/sources.list"
: > "$tmp/status"

apt_opts=(
    -o "Dir::State=$tmp/state"
    -o "Dir::State::status=$tmp/status"
    -o "Dir::Cache=$tmp/cache"
    -o "Dir::Etc::SourceList=$tmp/sources.list"
    -o "Dir::Etc::SourceParts=$tmp/sources.list.d"
    -o "Dir::Etc::Preferences=$tmp/preferences"
    -o "Dir::Etc::PreferencesParts=$tmp/sources.list.d"
    # Run as the calling user in the private tree (the _apt sandbox user cannot write there).
    -o "APT::Sandbox::User=$(id -un)"
    -o "Debug::NoLocking=1"
)
echo "fetch_ort_headers: indexing $suite main from the host's mirror" >&2
apt-get -q "${apt_opts[@]}" update >"$tmp/update.log" 2>&1 || { cat "$tmp/update.log" >&2; exit 1; }
(cd "$tmp/deb" && apt-get -q "${apt_opts[@]}" download libonnxruntime-dev >"$tmp/download.log" 2>&1) \
    || { cat "$tmp/download.log" >&2; exit 1; }
deb="$(ls "$tmp"/deb/*.deb | head -n1)"
dpkg-deb -x "$deb" "$tmp/root"

src="$tmp/root/usr/include/onnxruntime"
[[ -f "$src/onnxruntime_c_api.h" ]] || { echo "fetch_ort_headers: $(basename "$deb") has no onnxruntime_c_api.h" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
cp -r "$src" "$dest/include"
dpkg-deb -f "$deb" Package Version > "$dest/SOURCE"
echo "$dest/include"
