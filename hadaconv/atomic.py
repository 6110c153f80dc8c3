"""Atomic writes of files and folders: the one way hadaconv puts an output in place.

Every output (converted folders, ONNX bundles, sampled JSONL, distillation checkpoints) is written
into a temporary sibling (``.NAME.XXXX.tmp`` in the same folder, so the final rename stays on one
file system), flushed to disk with ``fsync`` and renamed over the target.  Readers see the old
output or the new one, never a torn one; a failure removes the temporary and leaves the old output
as it was.

Permissions come from the process umask like those of any other new file (0644 files and 0755
folders under the usual 0022), not 0600/0700 as ``tempfile.mkstemp``/``mkdtemp`` (or safetensors'
own writer) would give: a bundle copied to a service account must stay readable.

Replacing an existing folder takes two renames (the old folder aside, the new one in); if the
second fails, the old folder is renamed back before the error propagates.  Whether an existing
output may be replaced at all is decided beforehand, by :func:`check_output`, before any work.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator

from hadaconv.errors import ModelFormatError, OutputError, option, output_error

__all__ = ["MANIFEST", "atomic_file", "atomic_folder", "check_not_input", "check_output"]

_ATTEMPTS = 100


def check_output(path: str | os.PathLike, overwrite: bool = False, *, folder: bool,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """``path`` as a Path, after refusing an output that may not or cannot be written, so that a
    long run cannot fail there at its end: the one check every writer calls before its work.

    ``folder=True`` (converted folders, bundles): an existing non-empty folder needs
    ``overwrite``, and is replaced only while it holds just what hadaconv wrote there (as its
    :data:`MANIFEST` lists; a folder from before the manifest: a converted model's or a bundle's
    marker file, and only files of the names hadaconv writes): ``-o ~/projects --overwrite`` must
    not delete the user's own files, nor notes added to a converted folder.  An empty folder is fine (one made
    beforehand); a file there is refused even with ``overwrite`` (``-o model.gguf`` must not
    replace the input).  ``folder=False`` (JSONL,
    ...): an existing file needs ``overwrite``; a folder there, or a missing parent folder, is
    refused.  In both, the folder the output goes in (for a folder output: its nearest existing
    ancestor, as the missing ones are created) must be a folder this process may write in.
    A folder output is never the current folder, the home folder or one holding either.
    ``inputs``: the files and folders the run reads (None, and names not on disk, skipped); an
    output that is one of them, a folder holding one, or inside one is refused even with
    ``overwrite``: an input is never changed (``convert st -o st --overwrite``).
    Raises :class:`~hadaconv.errors.OutputError` with one line.
    """
    if not os.fspath(path).strip():  # an unset shell variable: Path("") is the current folder
        raise OutputError(f"the output names no {'folder' if folder else 'file'} (an empty name)")
    path = Path(path)
    check_not_input(path, inputs)
    if folder:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} exists and is not a folder")
        _check_not_around_us(path)
        taken = path.is_dir() and any(path.iterdir())
        _check_writable(path)
    else:
        if path.is_dir():
            raise OutputError(f"{path} is a folder, not a file")
        if not path.parent.is_dir():
            raise OutputError(f"the folder {path.parent} does not exist")
        taken = path.exists()
        _check_writable(path)
    if taken and not overwrite:
        what = "folder" if folder else "file"
        raise OutputError(f"{path} already exists{' and is not empty' if folder else ''}: pass "
                          f"{option('overwrite', True)} to replace it, or choose another {what}")
    if taken and folder:
        _check_replaceable(path)
    return path


#: The names of the files a folder output holds, written beside them by :func:`atomic_folder`:
#: ``overwrite`` replaces a folder only while it holds nothing else (notes a user added to a
#: converted folder must not vanish with it).
MANIFEST = ".hadaconv-files"
_MANIFEST_LIMIT = 1 << 20  # bytes; the file is untrusted
#: What file managers leave in any folder they show, which ``overwrite`` may remove with it.
_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# Folders written before the manifest: converted and distilled models hold a config.json with a
# "hadaconv" section (hadaconv.io.converted), ONNX bundles hadaconv_onnx.json (export.bundle.METADATA),
# and only files of the names these patterns match.
_BUNDLE_METADATA = "hadaconv_onnx.json"
# The tokenizer's files are hadaconv.io.files.TOKENIZER_FILES, read where checked (io imports torch).
_EARLIER_NAMES = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|report\.json|"
                            r"distill_curve\.png|model\.onnx(\.data)?|hadaconv_onnx\.json|genai_config\.json|"
                            r"lib\w+\.(so|dylib|dll)")


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder hadaconv did not write, or one holding more than it wrote,
    naming what it holds besides (up to five entries)."""
    entries = sorted(e for e in folder.iterdir() if e.name not in _LITTER)
    manifest = folder / MANIFEST
    if manifest.exists() or manifest.is_symlink():
        listed = _read_manifest(manifest)
        allowed = (lambda e: e.name in listed) if listed is not None else (lambda e: False)
    elif _marked(folder):  # written before the manifest
        from hadaconv.io.files import TOKENIZER_FILES

        allowed = (lambda e: e.name in TOKENIZER_FILES or _EARLIER_NAMES.fullmatch(e.name) is not None)
    else:
        raise OutputError(f"{folder} holds files hadaconv did not write: {option('overwrite', True)} replaces only "
                          "a converted model or an ONNX bundle; remove the folder yourself, or choose another")
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries
               if e.name != MANIFEST and (e.is_dir() or e.is_symlink() or not allowed(e))]
    if foreign:
        them = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{folder} holds {them}, which hadaconv did not write: {option('overwrite', True)} "
                          "replaces only what hadaconv wrote; move them out of it, or choose another folder")


def _read_manifest(path: Path) -> set[str] | None:
    """The names a manifest lists; None where it cannot be read (no regular file, too large):
    then nothing in the folder counts as listed."""
    try:
        if not path.is_file() or path.is_symlink():
            return None
        with path.open("rb") as f:
            raw = f.read(_MANIFEST_LIMIT + 1)
    except OSError:
        return None
    if len(raw) > _MANIFEST_LIMIT:
        return None
    return {line for line in raw.decode("utf-8", "replace").splitlines() if line and "/" not in line}


def _marked(folder: Path) -> bool:
    """Whether ``folder`` holds the marker file of a folder output written before the manifest."""
    from hadaconv.io.files import converted_meta  # here: atomic is imported where torch need not be

    if (folder / _BUNDLE_METADATA).is_file():
        return True
    try:
        return converted_meta(folder / "config.json") is not None
    except (OSError, ModelFormatError):  # missing, unreadable or not a JSON object: not one we wrote
        return False


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                    name: str = "the output") -> None:
    """Refuse an output ``path`` (``name`` says which) that is an existing input, a folder holding
    one, or anything inside an input folder: an existing file (``sample HF -o HF/config.json``)
    would be replaced, and a new entry (``export conv -o conv/onnx``) would change the input, and
    stop a later ``overwrite`` of it (the folder would hold one it did not write).  ``inputs``:
    paths (None, objects and names not on disk are skipped).  Raises OutputError."""
    path = Path(path)
    out = path.resolve()
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)) or not os.fspath(given) or not Path(given).exists():
            continue  # None, a model object, or a name that is not on disk: nothing to protect
        source = Path(given).resolve()
        around, inside = _holds(out, source), _holds(source, out)
        if inside and not around:
            raise OutputError(f"{name} {path} is inside the input {given}: hadaconv never writes into its "
                              "inputs; choose an output outside it")
        if around:
            what = "is" if inside else "is a folder holding"
            raise OutputError(f"{name} {path} {what} the input {given}: writing it would replace the input; "
                              "choose another output")


def _check_not_around_us(path: Path) -> None:
    """Refuse a folder output that is the current folder, the home folder or a folder holding
    either: a folder output replaces the whole folder, so ``-o . --overwrite`` would delete what
    the user is working in (a newcomer's trial lost a file that way)."""
    out = path.resolve()
    places = [(Path.cwd(), "the current folder")]
    with contextlib.suppress(RuntimeError):  # no HOME and no passwd entry (an arbitrary container user)
        places.append((Path.home(), "your home folder"))
    for place, name in places:
        place = place.resolve()
        if _holds(out, place):
            what = name if _holds(place, out) else f"a folder holding {name}"
            raise OutputError(f"the output {path} is {what}: a folder output replaces the whole folder; "
                              "choose a new or empty folder inside it")


def _holds(folder: Path, path: Path) -> bool:
    """Whether the resolved ``path`` is ``folder`` or lies inside it: by name, or as the same
    folder under another name (a case-insensitive file system, a bind mount, a hard link)."""
    return folder == path or folder in path.parents or _same_file(folder, (path, *path.parents))


def _same_file(out: Path, candidates: tuple[Path, ...]) -> bool:
    """Whether the existing ``out`` is one of ``candidates`` by another name (a case-insensitive
    file system, a hard link), which the resolved paths do not show."""
    if not out.exists():
        return False
    return any(p.exists() and os.path.samefile(out, p) for p in candidates)


def _check_writable(path: Path) -> None:
    """Refuse an output ``path`` whose folder (or, where it is missing, its nearest existing
    ancestor) is a file, or cannot take a new entry.  Creating one is the test: ``os.access``
    lets root past the permission bits and knows nothing of /proc, /sys, ACLs or FUSE mounts,
    which would refuse the write only after the work."""
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise OutputError(f"cannot create a folder under {existing}: it is a file, not a folder")
    try:
        probe = _sibling(existing / "hadaconv-write-check", ".tmp", os.mkdir)
    except OSError as exc:
        raise OutputError(f"{output_error(path, exc)}: nothing can be created in {existing}") from None
    with contextlib.suppress(OSError):  # made, so writable: an append-only folder may keep it
        os.rmdir(probe)


def _sibling(target: Path, suffix: str, make) -> Path:
    """A new, unused sibling of ``target`` created by ``make(path)`` (which must fail with
    FileExistsError when the name is taken)."""
    for _ in range(_ATTEMPTS):
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            make(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name next to {target}")  # pragma: no cover


def _unused(path: Path) -> None:
    # The old output is renamed onto this name, which must not exist (a rename would replace it).
    if path.exists() or path.is_symlink():
        raise FileExistsError(path)


def _new_file(path: Path) -> None:
    # 0o666 & ~umask, exactly as open(path, "w") would create it.
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)  # the umask applies, as for any mkdir


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(root: Path, umask: int) -> None:
    """Give every file and folder under ``root`` the mode a plain ``open``/``mkdir`` would
    (0o666, or 0o777 for executables and folders, less the umask), then fsync the files and the
    folders (the entries they hold).  Writers such as safetensors create their files 0600."""
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o777 & ~umask)
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)
                _fsync(path)
        _fsync(Path(folder), directory=True)


def _entries(folder: Path) -> set[str]:
    return {e.name for e in folder.iterdir()} if folder.is_dir() and not folder.is_symlink() else set()


def _check_nothing_added(out: Path, before: set[str]) -> None:
    """Refuse to replace ``out`` when entries came into it after the write began: they are
    someone's, and the check that allowed the replacement did not see them."""
    added = sorted(_entries(out) - before)
    if added:
        raise OutputError(f"{out} gained {', '.join(added[:5])} while this run wrote its replacement: it was not "
                          "replaced; move them out of it and run again")


def _write_manifest(folder: Path) -> None:
    names = sorted(e.name for e in folder.iterdir() if e.name != MANIFEST)
    (folder / MANIFEST).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _publish_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` goes aside first and comes back if the
    final rename fails."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    aside = _sibling(out, ".old", _unused)
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _remove(aside)


@contextlib.contextmanager
def _named(target: Path) -> Iterator[None]:
    """File-system failures (a read-only folder, a full disk), from here or from the writer in
    the block, as one OutputError naming ``target``.  safetensors reports them as its own
    SafetensorError, matched by name so that this module needs no safetensors."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise output_error(target, exc) from None
        raise


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; when the block succeeds its contents are
    fsynced and it is renamed to ``out`` (replacing an existing ``out``, file or folder).

    On any exception the temporary is removed and ``out`` is left untouched.  The caller decides
    beforehand whether replacing ``out`` is allowed (:func:`check_output`); a folder ``out`` that
    gained entries while the block ran (a streamed conversion or an export takes long) is not
    replaced: OutputError, naming them, and the new output is discarded.  The
    folder gets its :data:`MANIFEST`.  File-system failures raise
    :class:`~hadaconv.errors.OutputError` (an OSError) naming ``out``.
    """
    out = Path(out)
    with _named(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out, ".tmp", _new_folder)
        umask = 0o777 & ~os.stat(tmp).st_mode  # mkdir(0o777) applied exactly the umask
        before = _entries(out)
        try:
            yield tmp
            _write_manifest(tmp)
            _finish_tree(tmp, umask)
            _check_nothing_added(out, before)
            _publish_folder(tmp, out)
            _fsync(out.parent, directory=True)
        finally:
            if tmp.exists():
                _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of an empty temporary file next to ``path`` (write it by name: ``open``,
    ``torch.save``, ...); when the block succeeds it is fsynced and renamed over ``path``.

    On any exception the temporary is removed and an existing ``path`` is left untouched (a
    single rename replaces a file, so there is nothing to restore).  File-system failures raise
    :class:`~hadaconv.errors.OutputError` (an OSError) naming ``path``.
    """
    path = Path(path)
    with _named(path):
        tmp = _sibling(path, ".tmp", _new_file)
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask
        try:
            yield tmp
            os.chmod(tmp, mode)  # in case the writer replaced the file
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent, directory=True)
        finally:
            if tmp.exists():
                _remove(tmp)
