"""Generation and embedding with an exported bundle in ONNX Runtime.

:func:`generate` runs a causal LM exported with the KV cache: one prefill over the (left-padded)
prompts with an empty past, then one single-token step per new token, each feeding the previous
step's ``present.*`` back as ``past_key_values.*`` through ONNX Runtime IO binding (the cache
stays on the execution provider's device).  Greedy by default; ``temperature > 0``
samples (optionally from the ``top_k`` most likely tokens); ``repetition_penalty > 1`` makes
tokens already in the sequence less likely; ``chat=True`` wraps each text prompt in the
tokenizer's chat template as one user turn.  :func:`embed` runs an encoder, :func:`classify` a
classifier (an encoder with a sequence or token classification head).

Both accept an opened :class:`~hadaconv.export.bundle.Bundle`, a bundle folder, or a bare
``onnxruntime.InferenceSession`` (the cache layout is then read off the session's inputs).
bfloat16 bundles (``export --dtype bfloat16``, run by the CUDA execution provider) work alike:
the cache stays bfloat16, and the outputs the host reads (logits, embeddings) are widened to
float32, as numpy has no bfloat16.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np

from hadaconv.errors import HadaconvError, InputError, check_int, check_number, indefinite, option
from hadaconv.export.bundle import Bundle, context_length, open_bundle, positive_int, tokenizer_missing

__all__ = ["Classification", "Embedding", "Generation", "check_sampling", "classify", "embed", "generate",
           "special_tokens"]

# Element types of the cache as ``OrtValue.ortvalue_from_shape_and_type`` takes them: numpy has no
# bfloat16, so that one goes by its ONNX type number (TensorProto.BFLOAT16 = 16).
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(bfloat16)": 16}


@dataclass
class Generation:
    """The result of :func:`generate`.

    Attributes:
        tokens: int64 [batch, new], the generated ids; a row that ended early is filled with the
            pad id after its end-of-text token.
        text: the decoded new text of each row (special tokens skipped), or None when no
            tokenizer is known (a bare session without ``tokenizer=``, or ids into a bundle
            exported without one).
        prompt_tokens: the prompt's length in tokens (the padded length for a batch).
        prefill_s, decode_s: wall-clock seconds of the prefill (the prompt and the first new
            token) and of the decode steps after it.
        finished: every row ended at an end-of-text token, not at ``max_new_tokens``.
        new_tokens, tokens_per_s: properties, the new tokens per row and the decode throughput.
    """

    tokens: np.ndarray
    text: list[str] | None
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    finished: bool = False

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens (all rows) per second of decode steps."""
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return self.tokens.shape[0] * steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class Embedding:
    """The result of :func:`embed`, in the bundle's dtype (float32 from a bfloat16 bundle).

    Attributes:
        sentence_embedding: [batch, hidden], the attention-masked mean of the last hidden state;
            divided by its L2 norm where :func:`embed` was asked to ``normalize``.
        last_hidden_state: [batch, seq, hidden], padded positions included.
    """

    sentence_embedding: np.ndarray
    last_hidden_state: np.ndarray


@dataclass
class Classification:
    """The result of :func:`classify`, in the bundle's float dtype (float32 from a bfloat16 bundle,
    widened exactly).

    Attributes:
        logits: [batch, labels] from a sequence classification head, [batch, seq, labels] from a
            token classification head or a masked LM (padded positions included;
            ``attention_mask`` marks them).
        labels: the label names by index: the model's ``id2label`` as exported; a masked LM's
            tokens (logits as wide as the vocabulary, with a tokenizer); else LABEL_0, ...
        input_ids: [batch, seq] int64, the tokens classified (padded).
        attention_mask: [batch, seq], 1 for the tokens of the input, 0 for padding.
        function: what turns logits into :attr:`scores`, as transformers' classification
            pipelines choose it: "softmax" over the labels (always for token heads, which train
            with cross-entropy), and for sequence heads "sigmoid" for each label
            (``problem_type="multi_label_classification"``, or one logit) or "none"
            (``problem_type="regression"``: the logits are the predicted values).
        multi_label: a sequence head with ``problem_type="multi_label_classification"``: each
            input takes every label whose sigmoid is above 0.5.
        special_tokens_mask: [batch, seq], 1 where the tokenizer put its special tokens ([CLS],
            [SEP], padding; in token ids given as such, its cls, sep, bos, eos and pad ids), which a
            token head's :attr:`predicted` skips; None without a tokenizer.
        mask_token_id: a masked LM's mask token ([MASK]), whose positions :meth:`fill_mask`
            fills; None for other heads, or without a tokenizer.
    """

    logits: np.ndarray
    labels: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    function: str = "softmax"
    multi_label: bool = False
    special_tokens_mask: np.ndarray | None = None
    mask_token_id: int | None = None

    @property
    def per_token(self) -> bool:
        """A token classification head (or a masked LM): one prediction per input token."""
        return self.logits.ndim == 3

    @property
    def token_positions(self) -> list[np.ndarray]:
        """Per input, the positions a token head's predictions cover (int64, ascending): its
        tokens without padding or, as transformers' token classification pipeline does, the
        tokenizer's special tokens."""
        keep = self.attention_mask == 1
        if self.special_tokens_mask is not None:
            keep &= self.special_tokens_mask == 0
        return [np.flatnonzero(row) for row in keep]

    @cached_property
    def scores(self) -> np.ndarray:
        """Probabilities (float64, shaped like ``logits``; computed once): :attr:`function` of the
        logits; a regression head's values as they are."""
        z = self.logits.astype(np.float64)
        if self.function == "none":
            return z
        if self.function == "sigmoid":
            return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without exp's overflow
        return _softmax(z)

    @property
    def predicted(self) -> list:
        """Each input's most likely label name, or for a token head each input's list of them, one
        per token of :attr:`token_positions` (padding and special tokens dropped).  A multi-label
        sequence head gives the list of labels above 0.5; a regression head its value (one float,
        or a list of floats for several outputs)."""
        def pick(row: np.ndarray) -> Any:
            if self.function == "none":
                return float(row[0]) if len(row) == 1 else [float(v) for v in row]
            if self.multi_label:
                return [self.labels[j] for j in np.flatnonzero(row > 0.5)]
            return self.labels[int(np.argmax(row))]

        scores = self.scores
        if not self.per_token:
            return [pick(row) for row in scores]
        return [[pick(seq[p]) for p in kept] for seq, kept in zip(scores, self.token_positions)]

    def fill_mask(self, top_k: int = 5) -> list[list[tuple[int, list[tuple[str, float]]]]]:
        """A masked LM's candidates for each mask token, as transformers' fill-mask pipeline ranks
        them: per input, a (position in ``input_ids``, [(token, probability), ...]) pair for each
        mask token in order, the ``top_k`` most likely tokens first (an input without one gets an
        empty list).  Tokens are the vocabulary's, as the tokenizer spells them ("##ing"), where
        the pipeline also gives them decoded; probabilities are the softmax over the vocabulary.

        Raises:
            InputError: ``top_k`` is not a positive integer.
            HadaconvError: not a masked LM's result with a tokenizer (:attr:`mask_token_id` None).
        """
        check_int("top_k", top_k, 1)
        if self.mask_token_id is None:
            raise HadaconvError("fill_mask needs a masked LM's result with a tokenizer that has a mask token")
        k = min(top_k, len(self.labels))
        found = (self.input_ids == self.mask_token_id) & (self.attention_mask == 1)
        out = []
        for logits, row in zip(self.logits, found):
            picks = []
            for p in np.flatnonzero(row):  # the mask rows alone: not [seq, vocab] probabilities
                probs = _softmax(logits[p].astype(np.float64))
                best = np.argsort(-probs, kind="stable")[:k]
                picks.append((int(p), [(self.labels[j], float(probs[j])) for j in best]))
            out.append(picks)
        return out


def _softmax(z: np.ndarray) -> np.ndarray:
    """The softmax over the last axis, shifted by its maximum (no overflow)."""
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


#: What a text input without a tokenizer can do instead.
_NO_TOKENIZER = ("a bare session, or a bundle exported without one, has none: pass tokenizer=..., or give "
                 "token ids instead")


def _resolve(target: Bundle | str | os.PathLike | Any, tokenizer: Any) -> tuple[Any, Any, dict]:
    """(session, tokenizer, metadata) from a bundle, a folder or a session."""
    if isinstance(target, (str, os.PathLike)):
        target = open_bundle(target)
    if isinstance(target, Bundle):
        return target.session, tokenizer or target.tokenizer, target.meta
    if not hasattr(target, "run") or not hasattr(target, "get_inputs"):
        raise HadaconvError(f"expected a bundle, a bundle folder or an onnxruntime session, got {type(target).__name__}")
    return target, tokenizer, {}


def _context(target: Bundle | str | os.PathLike | Any, meta: dict) -> int | None:
    """The bundle's context length in tokens (:func:`context_length`); None for a bare session."""
    folder = target.path if isinstance(target, Bundle) else target if isinstance(target, (str, os.PathLike)) else None
    return context_length(folder, meta) if folder is not None else None


def check_context(context: int | None, prompt: int, max_new_tokens: int) -> None:
    """InputError where a ``prompt`` of that many tokens (the longest row of a batch) and
    ``max_new_tokens`` overrun the ``context`` (None: unknown, no check).  P + N <= C is allowed, as
    onnxruntime-genai sizes its KV cache (the last new token is never fed back, so the graph would
    take one more).  Checked before the prefill: a long token-id prompt used to run minutes of it."""
    if context is None or prompt + max_new_tokens <= context:
        return
    if prompt >= context:
        raise InputError(f"the prompt is {prompt} tokens, and the model's context of {context} tokens must also "
                         "hold the new ones: shorten the prompt")
    raise InputError(f"the prompt is {prompt} tokens, so the model's context of {context} tokens leaves room for "
                     f"{context - prompt} new ones: give {option('max_new_tokens', context - prompt)} or fewer, or "
                     "shorten the prompt")


def _encoder_limit(tokenizer: Any, meta: dict) -> int | None:
    """The most tokens the encoder reads: the smaller of its position table (recorded at export,
    ``context_length``) and its tokenizer's ``model_max_length``; None where neither says
    (transformers' stand-in for "none" is about 1e30)."""
    limits = [positive_int(meta.get("context_length")), positive_int(getattr(tokenizer, "model_max_length", None))]
    known = [n for n in limits if n is not None and n < 1_000_000]
    return min(known) if known else None


def _check_lengths(lengths: Sequence[int], limit: int | None, noun: str = "text", cut: str | None = None) -> None:
    """InputError naming the first input (a "text", a "pair" of texts, an "input" of token ids)
    over the encoder's ``limit`` (before ONNX Runtime fails on an Expand node past the position
    table), with ``cut``, what else would do (default: text can be cut there, as
    sentence-transformers cuts every text)."""
    cut = f", or cut it there with {option('truncate', True)}" if cut is None else cut
    for i, n in enumerate(lengths):
        if limit is not None and n > limit:
            which = f"{noun} {i + 1}" if len(lengths) > 1 else f"the {noun}"
            raise InputError(f"{which} is {n} tokens, more than the {limit} this model reads: shorten it{cut}")


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as one user turn of the tokenizer's chat template, ready for the assistant's reply
    (the template writes its own special tokens, so the tokenizer adds none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("chat needs a tokenizer with a chat template: this one has none (prompt without chat)")
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
    return tokenizer(wrapped, add_special_tokens=False)["input_ids"]


def _encode(prompt: Any, tokenizer: Any, pad_id: int, chat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask from text (one or several prompts) or ids ([seq] or [batch, seq])."""
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt)):
        if tokenizer is None:
            raise HadaconvError(f"text prompts need a tokenizer: {tokenizer_missing() or _NO_TOKENIZER}")
        texts = [prompt] if isinstance(prompt, str) else prompt
        rows = [_chat_ids(tokenizer, p) if chat else tokenizer(p)["input_ids"] for p in texts]
    elif chat:
        raise InputError("chat wraps text prompts in the chat template: give text, not token ids")
    else:
        rows = [list(r) for r in _token_ids(prompt)]
    if any(len(r) == 0 for r in rows):
        raise HadaconvError("a prompt encodes to no tokens")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _token_ids(ids: Any) -> np.ndarray:
    """Token ids given as an array (numpy, torch, nested lists) -> int64 [batch, seq], checked:
    a float array would be truncated and a negative id would wrap around in the graph's Gather."""
    try:
        arr = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids)
    except ValueError:  # ragged nested lists
        raise InputError("token ids must be a rectangular integer array: rows of a batch have one length (pad "
                         "them, or give one row at a time)") from None
    if arr.ndim not in (1, 2) or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"token ids must be a non-empty integer array [seq] or [batch, seq], got "
                         f"{arr.dtype} of shape {list(arr.shape)}")
    if arr.min() < 0:
        raise InputError(f"token ids must be >= 0, got {int(arr.min())}")
    return np.atleast_2d(arr).astype(np.int64)


def _check_vocabulary(session: Any, ids: np.ndarray, mask: np.ndarray, meta: dict, *,
                      lm_logits: bool = True) -> None:
    """InputError for a prompt id at or past the vocabulary size (a causal LM's logits' static last
    axis, else the ``vocab_size`` the bundle records), which would otherwise fail inside the graph's
    embedding Gather with ONNX Runtime's own message.  A classifier's logits are over its labels:
    ``lm_logits=False`` reads the recorded size alone."""
    vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits" and o.shape), None) \
        if lm_logits else None
    if not isinstance(vocab, int):
        vocab = positive_int(meta.get("vocab_size"))
    top = int(ids[mask == 1].max())
    if isinstance(vocab, int) and top >= vocab:
        raise InputError(f"token id {top} is outside the vocabulary of {vocab} tokens (ids 0 to {vocab - 1})")


def _host(value: Any) -> np.ndarray:
    """An OrtValue in host memory as a numpy array; bfloat16, which numpy lacks (``OrtValue.numpy``
    refuses it), widened exactly to float32: its 16 bits are the high half of a float32's."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = value.shape()
    raw = (ctypes.c_uint16 * int(np.prod(shape))).from_address(value.data_ptr())
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    return pos[:, -new:]


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    """The tokens of a row before its first EOS."""
    return next((row[:i] for i, t in enumerate(row) if t in eos), row)


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """The repetition penalty of CTRL (Keskar et al. 2019, eq. 2, as Hugging Face's
    ``repetition_penalty`` applies it): the logit of every token already in the row's sequence is
    divided by ``penalty`` where positive and multiplied by it where negative, so it loses
    probability either way.  logits [batch, vocab] float, seen [batch, vocab] bool."""
    z = logits.astype(np.float64)
    return np.where(seen, np.where(z > 0, z / penalty, z * penalty), z)


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def _remembering(pick: Any, ids: np.ndarray, mask: np.ndarray, penalty: float) -> Any:
    """``pick`` with the repetition penalty on each row's sequence so far: the prompt's tokens
    (padding excluded), then every token it picks."""
    rows = np.arange(ids.shape[0])
    seen = None

    def penalized(logits: np.ndarray) -> np.ndarray:
        nonlocal seen
        if seen is None:  # the vocabulary is known from the first logits
            seen = np.zeros(logits.shape, dtype=bool)
            seen[np.nonzero(mask)[0], ids[mask == 1]] = True
        token = pick(_penalize(logits, seen, penalty))
        seen[rows, token] = True
        return token

    return penalized


_PAST = re.compile(r"past_key_values\.\d{1,6}\.(key|value)")


def _cache_inputs(session: Any, meta: dict) -> list[str]:
    """The ``past_key_values.*`` input names in layer order; HadaconvError when there is no cache."""
    inputs = [i.name for i in session.get_inputs()]
    past = [n for n in inputs if n.startswith("past_key_values.")]
    odd = next((n for n in past if not _PAST.fullmatch(n)), None)
    if odd is not None:  # the graph is untrusted: its names are parsed below
        raise HadaconvError(f"the graph's input {odd[:80]!r} is not a KV cache input (past_key_values.N.key or "
                            ".value): not a graph hadaconv exports")
    past.sort(key=lambda n: (int(n.split(".")[1]), n))
    if "input_ids" not in inputs or not past:
        kind, outputs = meta.get("kind"), [o.name for o in session.get_outputs()]
        again = ""
        if kind == "causal-lm" and "logits" in outputs:
            again = f": export it again without {option('cache', False, flag='--no-cache')}"
        elif kind == "causal-lm":  # metadata that says causal LM over another kind's graph
            again = f" and outputs {', '.join(outputs[:3])}: its metadata is damaged, export the bundle again"
        raise HadaconvError(f"generation needs a causal LM exported with the KV cache; this {kind or 'model'} bundle "
                            f"has inputs {', '.join(inputs)}{again}")
    return past


def special_tokens(meta: dict, eos_token_id: Any, pad_token_id: int | None) -> tuple[set[int], int]:
    """(EOS ids, pad id): the arguments, else the bundle's metadata, else pad = min EOS, else 0."""
    eos = meta.get("eos_token_id") if eos_token_id is None else eos_token_id
    eos_set = {i for i in ([eos] if isinstance(eos, int) else (eos or [])) if i >= 0}  # -1: "none" in old configs
    pad = pad_token_id if pad_token_id is not None else meta.get("pad_token_id")
    pad = None if pad is not None and pad < 0 else pad
    return eos_set, pad if pad is not None else (min(eos_set) if eos_set else 0)


def _cache_device(session: Any) -> tuple[str, int]:
    """(device type, device id) where the session's execution provider keeps tensors: ``("cuda",
    its device_id option)`` on the CUDA execution provider, else ``("cpu", 0)``."""
    if "CUDAExecutionProvider" in session.get_providers():
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def _empty_past(session: Any, past_names: list[str], batch: int, device: tuple[str, int]) -> dict[str, Any]:
    """The prefill's past: OrtValues [batch, heads, 0, head_dim] on ``device``."""
    from onnxruntime import OrtValue

    inputs = {i.name: i for i in session.get_inputs()}
    past = {}
    for name in past_names:
        shape = inputs[name].shape
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise HadaconvError(f"input {name} has no static heads/head size: {shape}")
        dtype = _NP.get(inputs[name].type, np.float32)
        past[name] = OrtValue.ortvalue_from_shape_and_type([batch, shape[1], 0, shape[3]], dtype, *device)
    return past


def _step(session: Any, feeds: dict[str, np.ndarray], past: dict[str, Any],
          device: tuple[str, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """One forward pass with IO binding: (last-position logits [batch, vocab] on the host, the
    presents as OrtValues on ``device``, keyed by the ``past_key_values.*`` name they feed next)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, value in past.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("logits", "cpu")  # the only tensor the host needs
    for name in past:
        binding.bind_output(name.replace("past_key_values.", "present."), *device)
    binding.synchronize_inputs()
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    logits, *presents = binding.get_outputs()  # in binding order
    logits = _host(logits)
    if logits.ndim != 3 or logits.shape[0] != feeds["input_ids"].shape[0] or logits.shape[-1] == 0:
        raise HadaconvError(f"the graph's logits came out {list(logits.shape)}, not [batch, tokens, vocabulary]: "
                            "not a causal LM's graph")
    return logits[:, -1], dict(zip(past, presents))


def _decode(session: Any, past_names: list[str], ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
            pick: Any, eos_set: set[int], pad: int, on_token: Any = None) -> tuple[np.ndarray, float, float]:
    """(new tokens [batch, <= max_new_tokens], prefill seconds, decode seconds): the prefill over
    ``ids`` with an empty past, then single-token steps until every row has hit EOS;
    ``on_token(tokens)`` sees each step's tokens as they come."""
    batch, has_positions = ids.shape[0], any(i.name == "position_ids" for i in session.get_inputs())
    device = _cache_device(session)
    try:
        past = _empty_past(session, past_names, batch, device)
    except HadaconvError:
        raise
    except Exception as exc:  # no memory on the device, a provider without it, ...
        raise HadaconvError(f"ONNX Runtime could not allocate the KV cache on {device[0]}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
    out_tokens = np.full((batch, max_new_tokens), pad, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    step_ids, prefill_s, decode_s = ids, 0.0, 0.0
    for step in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask}
        if has_positions:
            feeds["position_ids"] = _positions(mask, step_ids.shape[1])
        start = time.perf_counter()
        try:
            logits, past = _step(session, feeds, past, device)
        except Exception as exc:
            raise HadaconvError(f"ONNX Runtime failed at generation step {step}: {str(exc).strip().splitlines()[0]}") from None
        if step == 0:
            prefill_s = time.perf_counter() - start
        else:
            decode_s += time.perf_counter() - start
        token = np.where(done, pad, pick(logits))
        out_tokens[:, step] = token
        if on_token is not None:
            on_token(token.copy())
        done |= np.isin(token, list(eos_set))
        if done.all():
            return out_tokens[:, : step + 1], prefill_s, decode_s
        step_ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], 1)
    return out_tokens, prefill_s, decode_s


def check_sampling(temperature: float, top_k: int, seed: int | None) -> None:
    """Raise InputError for a bad ``temperature`` (finite, >= 0), ``top_k`` (an integer >= 0) or
    ``seed`` (None or an integer >= 0), or for ``top_k`` or ``seed`` given with greedy decoding
    (``temperature`` 0), where they would do nothing."""
    check_int("top_k", top_k, 0)
    check_number("temperature", temperature, 0)
    if seed is not None:  # numpy's own errors name neither the option nor the range
        check_int("seed", seed, 0)
    if temperature == 0 and (top_k or seed is not None):
        raise InputError(f"{option('top_k') if top_k else option('seed')} only matters when sampling: give "
                         f"{option('temperature')} above 0 too (0, the default, is greedy decoding)")


def generate(
    target: Bundle | str | os.PathLike | Any,
    prompt: str | Sequence[str] | Any,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    chat: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    tokenizer: Any = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with the KV cache.

    Every step runs with ONNX Runtime IO binding (``session.io_binding()``, ``run_with_iobinding``):
    the ``present.*`` outputs are bound to the execution provider's device (the CUDA device of the
    CUDA execution provider, else host memory), left there as OrtValues and bound as the next
    step's ``past_key_values.*``, so the KV cache never makes the device -> host -> device round
    trip of ``session.run``; only the logits are bound to host memory (source: ONNX Runtime's
    "I/O Binding" performance page and its Python ``IOBinding`` API; Optimum's ``use_io_binding``
    does the same).

    Args:
        target: a bundle (opened or its folder) or an ``onnxruntime.InferenceSession`` of a
            causal LM exported with the cache.
        prompt: text, a list of texts (left-padded into one batch) or token ids.
        temperature: 0 for greedy decoding; otherwise sampling at this temperature.
        top_k: sample from the k most likely tokens only (0: all).
        repetition_penalty: > 1 makes every token already in the row (prompt or generated) less
            likely, CTRL's penalty as Hugging Face applies it (its authors found 1.2 with greedy
            decoding a good balance); 1 leaves the logits as they are.
        chat: wrap each text prompt in the tokenizer's chat template as one user turn, ready for
            the assistant's reply (instruction-tuned models answer, rather than continue, then).
        eos_token_id: stop a row at this token (default: the bundle's); generation ends when
            every row has stopped.  None and no metadata: never stop early.
        pad_token_id: filler for padding and for rows that stopped (default: the bundle's, else EOS, else 0).
        seed: for sampling.
        tokenizer: overrides the bundle's (needed for text with a bare session).
        on_token: called after every step with that step's tokens (int64 [batch]; the pad token
            for rows that have stopped), as they come: what ``hadaconv run`` streams its reply
            with (the role of a Hugging Face ``TextStreamer``'s ``put``).

    Returns a :class:`Generation`: int64 tokens [batch, new], prefill and decode wall seconds.
    Raises HadaconvError (InputError for bad arguments, among them ``top_k`` or ``seed`` with
    greedy decoding, where they would do nothing: :func:`check_sampling`; transformers' generate
    warns there) on a model without a cache, bad prompts
    (among them a longest prompt that, with ``max_new_tokens``, overruns the bundle's context:
    :func:`check_context`) or an ONNX Runtime failure (one line, with the step).
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_number("repetition_penalty", repetition_penalty, 0, strict=True)
    check_sampling(temperature, top_k, seed)
    session, tokenizer, meta = _resolve(target, tokenizer)
    past_names = _cache_inputs(session, meta)
    eos_set, pad = special_tokens(meta, eos_token_id, pad_token_id)
    ids, mask = _encode(prompt, tokenizer, pad, chat)
    _check_vocabulary(session, ids, mask, meta)
    check_context(_context(target, meta), ids.shape[1], max_new_tokens)
    rng = np.random.default_rng(seed)
    pick = lambda logits: _pick(logits, temperature, top_k, rng)  # noqa: E731
    if repetition_penalty != 1:
        pick = _remembering(pick, ids, mask, repetition_penalty)
    tokens, prefill_s, decode_s = _decode(session, past_names, ids, mask, max_new_tokens, pick, eos_set, pad,
                                          on_token)
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(_until_eos(row, eos_set), skip_special_tokens=True) for row in tokens.tolist()]
    finished = bool(np.isin(tokens, list(eos_set)).any(axis=1).all()) if eos_set else False
    return Generation(tokens, text, int(ids.shape[1]), prefill_s, decode_s, finished)


def _run_on_host(session: Any, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One run with every output bound to host memory (``session.run`` cannot return bfloat16)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in outputs:
        binding.bind_output(name, "cpu")
    binding.synchronize_inputs()
    session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return {name: _host(value) for name, value in zip(outputs, binding.get_outputs())}


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):  # a string such as "no" would read as True
        raise InputError(f"{name} is True or False, got {value!r}")


def _is_text(text: Any) -> bool:
    return isinstance(text, str) or (isinstance(text, Sequence) and all(isinstance(t, str) for t in text))


def _text_feeds(session: Any, tokenizer: Any, meta: dict, text: Any, pair: Any = None,
                truncate: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """An encoder's or a classifier's feeds (input_ids, attention_mask, and token_type_ids where
    the graph takes them) from one text, a list of texts (one padded batch) or token ids [seq] /
    [batch, seq], checked against what it reads; ``pair`` holds each text's second text;
    ``truncate`` cuts texts at the limit (the tokenizer's truncation, which keeps the closing
    special token).  With them the special tokens mask [batch, seq]: 1 where the tokenizer put
    [CLS], [SEP], padding and the like (in token ids: its cls, sep, bos, eos and pad ids); None
    without a tokenizer."""
    _check_flag("truncate", truncate)
    if text is None:
        raise InputError("text is None: give a text, a list of texts, or token ids")
    if isinstance(text, Sequence) and not isinstance(text, str) and len(text) == 0:
        raise InputError(f"text is an empty {type(text).__name__}: give at least one text (or token ids)")
    names = {i.name for i in session.get_inputs()}
    if _is_text(text):
        feeds, special = _encode_texts(tokenizer, meta, text, pair, truncate, names)
    else:
        if pair is not None:
            raise InputError("text_pair needs text, not token ids: the tokenizer encodes the two texts of a pair")
        ids = _token_ids(text)
        mask = np.ones_like(ids)
        _check_lengths([ids.shape[1]], _encoder_limit(tokenizer, meta), "input",
                       f" ({option('truncate')} cuts text, not token ids)" if truncate else "")
        _check_vocabulary(session, ids, mask, meta, lm_logits=False)
        feeds = {"input_ids": ids, "attention_mask": mask}
        marks = [getattr(tokenizer, f"{t}_token_id", None) for t in ("cls", "sep", "bos", "eos", "pad")]
        special = None if tokenizer is None else np.isin(ids, [m for m in marks if m is not None]).astype(np.int64)
    if "token_type_ids" in names and "token_type_ids" not in feeds:  # one segment
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds, special


def _encode_texts(tokenizer: Any, meta: dict, text: str | Sequence[str], pair: Any, truncate: bool,
                  names: set[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`_text_feeds` for text: the tokenizer's encoding, as transformers' pipelines call it."""
    batch = [text] if isinstance(text, str) else list(text)
    seconds = _pairs(pair, len(batch))
    if tokenizer is None:
        raise HadaconvError(f"text needs a tokenizer: {tokenizer_missing() or _NO_TOKENIZER}")
    if len(batch) > 1 and getattr(tokenizer, "pad_token", "") is None:
        raise InputError(f"the tokenizer has no padding token, so {len(batch)} texts cannot run as one batch: "
                         "give one text at a time")
    limit = _encoder_limit(tokenizer, meta)
    cut = {"truncation": True, "max_length": limit} if truncate and limit is not None else {}
    # verbose=False: a text past the limit is refused below, without transformers' warning first
    enc = tokenizer(batch, seconds, padding=len(batch) > 1, return_tensors="np", return_special_tokens_mask=True,
                    verbose=False, **cut)
    _check_lengths(np.asarray(enc["attention_mask"]).sum(axis=1).tolist(), limit, "text" if pair is None else "pair")
    types = enc.get("token_type_ids")
    if (seconds is not None and types is not None and np.any(types) and "token_type_ids" not in names
            and not _reads_one_segment(meta)):
        raise HadaconvError("the tokenizer marks each pair's second text as segment 1, and this bundle's graph "
                            "takes no token_type_ids: export it again with this hadaconv, which gives a model "
                            "with segment types that input")
    special = np.asarray(enc["special_tokens_mask"], dtype=np.int64)
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names}, special


def _reads_one_segment(meta: dict) -> bool:
    """Whether a graph without ``token_type_ids`` loses nothing of a pair by running it as one
    segment: its model has fewer than two segment types (DeBERTa-v3's none, whose forward ignores
    them), or none recorded (a model without ``type_vocab_size``), or it is a bare session,
    whose model its caller knows.  A bundle written before ``segment_types`` was recorded may have
    dropped a BERT's segments."""
    if not meta:
        return True
    if "segment_types" not in meta:
        return False
    return meta["segment_types"] is None or meta["segment_types"] < 2


def _pairs(pair: Any, texts: int) -> list[str] | None:
    """Each text's second text (a sentence pair), one for each of the ``texts`` texts."""
    if pair is None:
        return None
    seconds = [pair] if isinstance(pair, str) else pair
    if not _is_text(seconds):
        odd = [t for t in seconds if not isinstance(t, str)][:1] if isinstance(seconds, Sequence) else []
        got = f"{indefinite(type(pair).__name__)} with {odd[0]!r:.40} in it" if odd else type(pair).__name__
        raise InputError(f"text_pair must be a text or a list of texts, got {got}")
    if len(seconds) != texts:
        raise InputError(f"text_pair has {len(seconds)} text{'s' * (len(seconds) != 1)} for {texts} "
                         f"text{'s' * (texts != 1)}: give one for each text")
    return list(seconds)


def embed(target: Bundle | str | os.PathLike | Any, text: str | Sequence[str] | Any, *, tokenizer: Any = None,
          normalize: bool = False, truncate: bool = False) -> Embedding:
    """Sentence embeddings (mean-pooled last hidden states) of ``text`` (one text, a list run as one
    padded batch, or token ids [seq] / [batch, seq]) with an encoder bundle (float32 from a
    bfloat16 bundle, widened exactly; the bundle's own dtype otherwise).

    ``normalize`` divides each sentence embedding by its L2 norm (floored at 1e-12, as torch's
    ``F.normalize``): the last step of sentence-transformers pipelines that end in ``Normalize``,
    all-MiniLM-L6-v2's among them (its ``modules.json``), so that dot products are cosines.

    The encoder reads at most its position table (as recorded at export) or its tokenizer's
    ``model_max_length``, whichever is smaller; a model loaded from a sentence-transformers folder
    keeps its ``max_seq_length`` there (256 for all-MiniLM-L6-v2).  A longer text is refused, or
    with ``truncate`` cut at that length, as ``SentenceTransformer.encode`` cuts it.

    Raises:
        InputError: ``normalize`` or ``truncate`` not a bool, an empty list, ids that are not a
            non-negative integer array, past the recorded vocabulary, or an input longer than the
            encoder reads (a text, without ``truncate``), or several texts with a tokenizer that
            has no padding token.
        HadaconvError: not an encoder bundle, text without a tokenizer, or an ONNX Runtime failure.
    """
    _check_flag("normalize", normalize)
    session, tokenizer, meta = _resolve(target, tokenizer)
    outputs = [o.name for o in session.get_outputs()]
    if not {"sentence_embedding", "last_hidden_state"} <= set(outputs):
        listed = f"{', '.join(outputs[:3])}{', ...' if len(outputs) > 3 else ''}"
        if meta.get("kind") == "encoder":  # the metadata says encoder, the graph does not: a mismatched file
            what = f"this bundle's metadata says encoder, but its graph's outputs are {listed}"
        elif meta.get("kind"):
            what = f"this one is {indefinite(meta['kind'])} bundle"
        else:
            what = f"this session's outputs are {listed}"
        raise HadaconvError(f"embedding needs an encoder bundle (sentence_embedding and last_hidden_state outputs), "
                            f"and {what}")
    feeds, _ = _text_feeds(session, tokenizer, meta, text, truncate=truncate)
    try:
        result = _run_on_host(session, feeds, outputs)
    except Exception as exc:
        raise HadaconvError(f"ONNX Runtime failed: {str(exc).strip().splitlines()[0]}") from None
    pooled = result["sentence_embedding"]
    if normalize:
        norm = np.linalg.norm(pooled.astype(np.float64), axis=-1, keepdims=True)
        pooled = (pooled / np.maximum(norm, 1e-12)).astype(pooled.dtype)
    return Embedding(pooled, result["last_hidden_state"])


def _vocabulary_labels(tokenizer: Any, meta: dict, width: int) -> list[str] | None:
    """A masked LM's "labels" are its vocabulary: the tokenizer's tokens, where the logits span it
    (LABEL_i past the tokenizer's end, where the embedding was padded to a round size)."""
    if tokenizer is None or width != positive_int(meta.get("vocab_size")):
        return None
    known = tokenizer.convert_ids_to_tokens(list(range(min(width, len(tokenizer)))))
    return [str(t) if t is not None else f"LABEL_{i}" for i, t in enumerate(known)] + \
        [f"LABEL_{i}" for i in range(len(known), width)]


def _scoring(meta: dict, logits: np.ndarray) -> tuple[str, bool]:
    """(function, multi_label) of a :class:`Classification`: transformers' pipeline rule, where
    ``problem_type`` matters for sequence heads only (token heads train with cross-entropy)."""
    problem = meta.get("problem_type")
    if logits.ndim == 3:
        return "softmax", False
    if problem == "regression":
        return "none", False
    if problem == "multi_label_classification" or logits.shape[-1] == 1:
        return "sigmoid", problem == "multi_label_classification"
    return "softmax", False


def classify(target: Bundle | str | os.PathLike | Any, text: str | Sequence[str] | Any, *,
             text_pair: str | Sequence[str] | None = None, tokenizer: Any = None,
             truncate: bool = False) -> Classification:
    """Run a classifier bundle (what ``export`` writes for a Hugging Face encoder with a sequence or
    token classification head, or a masked LM's; kind ``classifier``, detected) on ``text``: one
    text, a list run as one padded batch, or token ids [seq] / [batch, seq].  ``text_pair`` gives
    each text a second text, for heads trained on sentence pairs (NLI, cross-encoders), encoded as
    transformers' pipelines encode ``{"text": ..., "text_pair": ...}``.  ``truncate`` cuts a text
    (or a pair) longer than the encoder reads at that length (:func:`embed` says which), where it
    is refused otherwise.
    :attr:`Classification.scores` applies what transformers' pipelines end in (a softmax, sigmoids,
    or nothing for regression: :attr:`Classification.function`); :attr:`Classification.predicted`
    names the labels.

    Raises:
        InputError: an empty list, ids that are not a non-negative integer array, past the recorded
            vocabulary, an input longer than the encoder reads (a text, without ``truncate``),
            several texts with a tokenizer that has no padding token, or a ``text_pair`` that is
            not one text for each text.
        HadaconvError: not a classifier bundle, text without a tokenizer, a pair for a bundle
            exported without ``token_type_ids`` whose tokenizer needs them, or an ONNX Runtime
            failure.
    """
    session, tokenizer, meta = _resolve(target, tokenizer)
    outputs = [o.name for o in session.get_outputs()]
    kind = meta.get("kind")
    if kind not in (None, "classifier") or outputs != ["logits"]:
        if kind in ("causal-lm", "encoder"):
            what = ("this is a causal LM bundle: hadaconv.generate.generate runs it" if kind == "causal-lm" else
                    "this is an encoder bundle: hadaconv.generate.embed runs it")
        elif kind not in (None, "classifier"):
            what = f"this is {indefinite(kind)} bundle: hadaconv.export.bundle.open_bundle runs it"
        else:
            what = f"its graph's outputs are {', '.join(outputs[:3])}{', ...' if len(outputs) > 3 else ''}"
        raise HadaconvError(f"classifying needs a classifier bundle (one logits output), and {what}")
    feeds, special = _text_feeds(session, tokenizer, meta, text, text_pair, truncate)
    try:
        logits = _run_on_host(session, feeds, outputs)["logits"]
    except Exception as exc:
        raise HadaconvError(f"ONNX Runtime failed: {str(exc).strip().splitlines()[0]}") from None
    if logits.ndim not in (2, 3):
        raise HadaconvError(f"a classifier's logits are [batch, labels] or [batch, seq, labels], got "
                            f"{list(logits.shape)}")
    if text_pair is not None and logits.ndim == 3:  # transformers' token and fill-mask pipelines take no pairs
        raise InputError(f"{option('text_pair')} is for heads that score the whole input (sentence pairs), and this "
                         "bundle's head scores each token: give one text at a time")
    vocabulary = None if meta.get("labels") else _vocabulary_labels(tokenizer, meta, logits.shape[-1])
    labels = meta.get("labels") or vocabulary or [f"LABEL_{i}" for i in range(logits.shape[-1])]
    if len(labels) != logits.shape[-1]:
        raise HadaconvError(f"the bundle's metadata (labels) names {len(labels)} labels and its logits have "
                            f"{logits.shape[-1]}: the metadata is damaged, export the bundle again")
    ids = feeds["input_ids"]
    mask = feeds.get("attention_mask", np.ones_like(ids))
    mask_id = getattr(tokenizer, "mask_token_id", None) if vocabulary and logits.ndim == 3 else None
    return Classification(logits, list(labels), ids, mask, *_scoring(meta, logits), special_tokens_mask=special,
                          mask_token_id=mask_id)
