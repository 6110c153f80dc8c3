"""Adapters: every family's attention blocks, their weight slots and head layout, the exactness
of folding per-head matrices into value rows, and PyTorch's nn.MultiheadAttention."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from hadaconv.adapters import attention_layers, check_convertible, find_adapter, generic_adapter
from hadaconv.adapters.base import WeightSlot
from hadaconv.adapters.mha import HookableMultiheadAttention, prepare_mha
from hadaconv.convert import install_projection, patch
from hadaconv.errors import HadaconvError
from hadaconv.hadamard import is_supported
from hadaconv.nn import HadamardProjection
from tiny_models import FAMILIES, example_inputs, make_tiny

EXPECTED = {  # family: (adapter, kind, blocks, heads, KV heads, head dim)
    "llama": ("llama", "causal-lm", 2, 4, 2, 16),
    "mistral": ("llama", "causal-lm", 2, 4, 2, 16),
    "qwen2": ("llama", "causal-lm", 2, 4, 2, 16),
    "qwen3": ("llama", "causal-lm", 2, 4, 2, 32),
    "mistral_nemo": ("llama", "causal-lm", 2, 4, 2, 8),
    "gemma2": ("gemma", "causal-lm", 2, 4, 2, 16),
    "gemma3": ("gemma", "causal-lm", 2, 4, 1, 32),
    "gpt2": ("gpt2", "causal-lm", 2, 4, 4, 16),
    "bert": ("bert", "encoder", 2, 4, 4, 12),
    "roberta": ("bert", "encoder", 2, 4, 4, 12),
    "opt": ("opt", "causal-lm", 2, 4, 4, 16),
    "gpt_neox": ("gpt_neox", "causal-lm", 2, 4, 4, 16),
    "phi": ("phi", "causal-lm", 2, 4, 4, 16),
    "phi3": ("phi", "causal-lm", 2, 4, 2, 16),
    "vit": ("bert", "encoder", 2, 4, 4, 16),
    "torch_mha": ("torch_mha", "module", 2, 4, 4, 8),
    "torch_mha_decoder": ("torch_mha", "module", 4, 4, 4, 8),
}


#: Gemma's RMSNorm computes in float32 whatever the model's dtype, so a float64 Gemma agrees with
#: itself only to float32 rounding (1e-8 on these outputs) once any input to a norm changes by
#: rounding; every other family runs in float64 throughout.
ATOL = {"gemma2": 1e-6, "gemma3": 1e-6}


def _output(result) -> torch.Tensor:
    """The main tensor of a model's output (logits, last_hidden_state or the tensor itself)."""
    return result if isinstance(result, torch.Tensor) else result[0]


def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(**inputs))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


def test_finds_every_block(family):
    model = make_tiny(family)
    adapter_name, kind, blocks, heads, kv_heads, head_dim = EXPECTED[family]
    adapter = find_adapter(model)
    layers = attention_layers(model)
    assert adapter.name == adapter_name and adapter.kind(model) == kind
    assert [layer.index for layer in layers] == list(range(blocks))
    assert len({id(layer.out_module) for layer in layers}) == blocks
    for layer in layers:
        assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (heads, kv_heads, head_dim)
        assert layer.out_module is layer.parent.get_submodule(layer.attr)
        assert model.get_submodule(layer.out_name) is layer.out_module
        w_o, _ = layer.out.get()
        w_v, _ = layer.value.get()
        assert w_o.shape == (layer.out_features, layer.width)
        assert layer.out_features == getattr(getattr(model, "config", None), "hidden_size", layer.width)
        assert w_v.shape[0] == kv_heads * head_dim
        check_convertible(layer)


def test_weight_slots_round_trip(family):
    model = make_tiny(family)
    for layer in attention_layers(model):
        for slot in (layer.out, layer.value):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            w, b = slot.get()
            slot.set(w * 2 + 1, None if b is None else b - 3)
            w2, b2 = slot.get()
            assert torch.equal(w2, w * 2 + 1)
            assert b is None or torch.equal(b2, b - 3)
            slot.set(w, b)
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_slot_touches_only_its_rows():
    weight = nn.Parameter(torch.zeros(4, 6))  # stored [in, out], 3 fused outputs of width 2
    bias = nn.Parameter(torch.zeros(6))
    slot = WeightSlot(weight, bias, rows=torch.arange(4, 6), transposed=True)
    slot.set(torch.ones(2, 4), torch.full((2,), 5.0))
    assert torch.equal(weight[:, 4:], torch.ones(4, 2)) and not weight[:, :4].any()
    assert torch.equal(bias, torch.tensor([0, 0, 0, 0, 5.0, 5.0]))


def test_folding_into_value_rows_is_exact(family):
    """Applying M_g to each query head's output (g its KV head) equals folding M_g into the value
    rows of KV head g; wrong value rows or head layouts make the two differ."""
    model = make_tiny(family).double()
    layers = attention_layers(model)
    folded = copy.deepcopy(model)
    inputs = example_inputs(family, model)
    g = torch.Generator().manual_seed(0)
    hooks = []
    for layer, layer_f in zip(layers, attention_layers(folded)):
        hd, group = layer.head_dim, layer.num_heads // layer.num_kv_heads
        m = torch.randn(layer.num_kv_heads, hd, hd, generator=g, dtype=torch.float64)

        def multiply(module, args, m=m, layer=layer, group=group):
            x = args[0].unflatten(-1, (layer.num_heads, layer.head_dim))
            return (torch.einsum("hij,...hj->...hi", m.repeat_interleave(group, 0), x).flatten(-2),)

        hooks.append(layer.out_module.register_forward_pre_hook(multiply))
        w, b = layer_f.value.get()
        w = torch.einsum("gij,gjk->gik", m, w.unflatten(0, (-1, hd))).flatten(0, 1)
        b = None if b is None else torch.einsum("gij,gj->gi", m, b.unflatten(0, (-1, hd))).flatten()
        layer_f.value.set(w, b)
    expected = _run(model, inputs)
    for hook in hooks:
        hook.remove()
    assert not torch.allclose(expected, _run(model, inputs))  # the hooks did something
    torch.testing.assert_close(_run(folded, inputs), expected, rtol=0, atol=ATOL.get(family, 1e-10))


def test_hadamard_structured_output_projection_is_reproduced(family):
    """Make W_o = G R H / sqrt(n) (+ beta); the installed HadamardProjection with the same G, R
    and beta gives the same model outputs: the swap sits exactly where W_o was, with the
    geometry of the model (rectangular for Qwen3, Mistral-Nemo, Gemma)."""
    model = make_tiny(family).double()
    inputs = example_inputs(family, model)
    block = 4
    torch.manual_seed(0)
    projections = []
    for layer in attention_layers(model):
        proj = HadamardProjection(layer.width, block=block, out_features=layer.out_features, dtype=torch.float64)
        with torch.no_grad():
            proj.gamma.normal_()
            proj.beta.normal_()
            if proj.keep is not None:  # a selection other than the default one
                proj.keep.copy_(torch.randperm(proj.n)[: proj.d_out].sort().values)
        has_bias = layer.out.bias is not None
        layer.out.set(proj.dense_weight(), proj.beta.detach() if has_bias else None)
        projections.append((layer, proj, has_bias))
    expected = _run(model, inputs)
    for layer, proj, has_bias in projections:
        new = install_projection(layer, block=block, bias=has_bias)
        new.load_state_dict({k: v for k, v in proj.state_dict().items() if has_bias or k != "beta"})
    torch.testing.assert_close(_run(model, inputs), expected, rtol=0, atol=ATOL.get(family, 1e-10))


def test_patch_runs(family):
    model = make_tiny(family)
    names = [layer.out_name for layer in attention_layers(model)]
    patch(model)
    out = _run(model, example_inputs(family, model))
    assert torch.isfinite(out).all()
    assert all(isinstance(model.get_submodule(n), HadamardProjection) for n in names)


def test_indices_are_stable_after_partial_conversion():
    model = make_tiny("llama")
    install_projection(attention_layers(model)[0])
    assert [layer.index for layer in attention_layers(model)] == [1]


# ------------------------------------------------------------------ checks and the fallback


def _qwen3(hidden: int, head_dim: int):
    import transformers

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    return transformers.Qwen3ForCausalLM(config)


def test_non_square_geometry_is_checked_on_the_larger_side():
    check_convertible(attention_layers(_qwen3(32, 16))[0], block=16)  # 64 into 32: transform on 64
    head_dim = next(h for h in range(10, 80, 2) if not is_supported(4 * h))  # 46: 184 has no Hadamard matrix
    layer = attention_layers(_qwen3(32, head_dim))[0]
    with pytest.raises(HadaconvError, match=f"order {4 * head_dim}") as info:
        check_convertible(layer)
    assert f"32 x {4 * head_dim}" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HadaconvError, match="does not divide the output width 32"):
        check_convertible(attention_layers(_qwen3(32, 16))[0], block=64)
    # patch() and install_projection() refuse through the same check (no layer that dies later).
    with pytest.raises(HadaconvError, match=str(4 * head_dim)):
        patch(_qwen3(32, head_dim))


def test_unsupported_width_is_reported():
    width = next(n for n in range(8, 1000, 4) if not is_supported(n))
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(width, 2, 16, batch_first=True), 1, enable_nested_tensor=False
    )
    layer = attention_layers(model)[0]
    with pytest.raises(HadaconvError, match=f"order {width}") as info:
        check_convertible(layer)
    assert layer.out_name in str(info.value) and "\n" not in str(info.value)


def test_generic_adapter_by_regex():
    model = make_tiny("llama")
    adapter = find_adapter(model, target=r"self_attn\.o_proj$")
    layers = adapter.layers(model)
    assert [layer.out_name for layer in layers] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert all(layer.value is None and layer.num_heads == 1 and layer.head_dim == 64 for layer in layers)
    install_projection(layers[0])
    assert [layer.index for layer in adapter.layers(model)] == [1]
    assert generic_adapter("k_proj").layers(model) == []  # 64 -> 32 (2 KV heads): not square ...
    assert find_adapter(model).name == "llama"  # ... and the fallback is never picked by itself


def test_generic_adapter_prepares_multihead_attention():
    model = make_tiny("torch_mha")
    inputs = example_inputs("torch_mha", model)
    before = _run(model, inputs)
    layers = attention_layers(model, target=r"self_attn\.out_proj$")
    assert len(layers) == 2 and all(
        isinstance(m, HookableMultiheadAttention) for m in (l.parent for l in layers)
    )
    install_projection(layers[0])
    assert not torch.allclose(_run(model, inputs), before)  # the swapped projection is used


def test_generic_adapter_skips_non_square():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    assert [layer.out_name for layer in generic_adapter(".").layers(model)] == ["0"]


@pytest.mark.parametrize("target", [None, "nothing_matches", "(unclosed"])
def test_nothing_to_convert_is_one_line(target):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with pytest.raises(HadaconvError) as info:
        find_adapter(model, target)
    message = str(info.value)
    assert "\n" not in message
    assert "Linear x1" in message or "regular expression" in message


@pytest.mark.parametrize("pattern", [r"layers\.1\.self_attn\.o_proj$", r"(self_attn|attention)\.o_proj",
                                     r"layers\.\d+\.attn\.out_proj$", r"^(?:encoder)\.layer\.\d{1,3}\.out$",
                                     r"(a|b)+x", r"a?b?c", r"h\.[0-9]+\.attn\.c_proj", r"(\.\d)+x",
                                     r".*layers.*attn.*o_proj", r"^(?!lm_head).*proj$"])
def test_targets_that_match_in_low_polynomial_time_are_taken(pattern):
    from hadaconv.adapters.generic import compile_target

    assert compile_target(pattern).pattern == pattern


@pytest.mark.parametrize("pattern, why", [
    (r"^(.|.)*$!", "repeats an alternation"), (r"(a+)+$", "repeats a repetition"),
    (r"(a|aa)*b", "repeats an alternation"), (r"(?:x*)*y", "repeats a repetition"),
    (r"((ab)*)+c", "repeats a repetition"), (r"(?=(a+)+)x", "repeats a repetition"),
    (r"(a|a?)+b", "repeats an alternation"),
    # Found by a review of the first version of the check:
    (r"(?>(.+)+!)", "atomic group"), (r"(x)?(?(1)x|(.+)+!)", "conditional"),
    (r"(aa?)+$", "repeats an item of varying length"), (r"(.?.)+!", "repeats an item of varying length"),
    (r".*a.*a.*a.*a!", "holds more than 3 unbounded repeats"), (r"(a)\1+", "backreference"),
])
def test_targets_that_backtrack_are_refused(pattern, why):
    """A converted folder records its target and loading it runs the pattern on every module
    name: a file must not be able to hang the load.  These are the textbook shapes of
    catastrophic backtracking (a repetition, an ambiguous alternation or a varying-length item
    under a repeat), constructs whose insides the check does not follow, and chains of
    unbounded repeats (polynomial, of any degree)."""
    from hadaconv.adapters.generic import compile_target

    with pytest.raises(HadaconvError, match=re.escape(why)):
        compile_target(pattern)


# ------------------------------------------------------------------- nn.MultiheadAttention

MHA_CONFIGS = [
    {"batch_first": True},
    {"batch_first": False},
    {"batch_first": True, "bias": False},
    {"batch_first": True, "add_bias_kv": True},
    {"batch_first": False, "add_zero_attn": True},
    {"batch_first": True, "kdim": 12, "vdim": 20, "add_bias_kv": True, "add_zero_attn": True},
]


def _mha_pair(config: dict, training: bool):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(16, 4, **config).double().train(training)
    if original.in_proj_bias is not None:
        with torch.no_grad():  # torch initialises biases to zero: make them matter
            original.in_proj_bias.normal_()
            original.out_proj.bias.normal_()
    return original, HookableMultiheadAttention.from_module(original)


def _mha_inputs(config: dict, cross: bool, batched: bool = True):
    g = torch.Generator().manual_seed(1)
    b, lq, lk = 3, 5, (7 if cross else 5)

    def make(length, dim):
        shape = (b, length, dim) if config["batch_first"] else (length, b, dim)
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = make(lq, 16)
    k = make(lk, config.get("kdim", 16)) if cross or "kdim" in config else q
    v = make(lk, config.get("vdim", 16)) if cross or "vdim" in config else q
    if not batched:
        q, k, v = (t[0] if config["batch_first"] else t[:, 0] for t in (q, k, v))
    padding = torch.zeros(b, lk, dtype=torch.bool)
    padding[1, -2:] = True
    causal = (
        nn.Transformer.generate_square_subsequent_mask(lq, dtype=torch.float64)[:, :lk] if lq == lk else None
    )
    return q, k, v, padding, causal


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("config", MHA_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_hookable_mha_matches_torch(config, training):
    original, ours = _mha_pair(config, training)
    assert ours.in_proj_bias is original.in_proj_bias and ours.out_proj is original.out_proj
    assert list(ours.state_dict()) == list(original.state_dict())
    cross = "kdim" in config
    q, k, v, padding, causal = _mha_inputs(config, cross=cross)
    lq, lk = 5, k.shape[1 if config["batch_first"] else 0]
    float_mask = torch.randn(3 * 4, lq, lk, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cases = [
        {},
        {"need_weights": False},
        {"key_padding_mask": padding},
        {"key_padding_mask": padding, "need_weights": False},
        {"attn_mask": float_mask, "average_attn_weights": False},
        {"attn_mask": float_mask > 1.0, "key_padding_mask": padding},
        {"attn_mask": float_mask, "key_padding_mask": padding.double() * -5, "need_weights": False},
    ]
    if causal is not None:
        cases += [
            {"attn_mask": causal, "is_causal": True, "need_weights": False},
            {
                "attn_mask": causal,
                "is_causal": True,
                "key_padding_mask": torch.zeros(padding.shape, dtype=torch.float64).masked_fill(
                    padding, float("-inf")
                ),
            },
        ]
    for kwargs in cases:
        expected = original(q, k, v, **kwargs)
        got = ours(q, k, v, **kwargs)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-12, msg=lambda m: f"{kwargs}: {m}")
        assert (got[1] is None) == (expected[1] is None)
        if expected[1] is not None:
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_hookable_mha_unbatched(batch_first):
    config = {"batch_first": batch_first}
    original, ours = _mha_pair(config, False)
    q, k, v, _, _ = _mha_inputs(config, cross=True, batched=False)
    for need_weights in (True, False):
        expected, got = original(q, k, v, need_weights=need_weights), ours(q, k, v, need_weights=need_weights)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-12)


def test_out_proj_is_really_used():
    original, ours = _mha_pair({"batch_first": True}, False)
    q, k, v, _, _ = _mha_inputs({"batch_first": True}, cross=False)
    seen = []
    ours.out_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    before = ours(q, k, v)[0]
    assert seen == [torch.Size([3, 5, 16])]
    ours.out_proj = nn.Identity()
    assert not torch.allclose(ours(q, k, v)[0], before)
    # The original ignores a swapped submodule: the reason HookableMultiheadAttention exists.
    kept = original.out_proj
    original.out_proj = nn.Identity()
    with pytest.raises(AttributeError):
        original(q, k, v)
    original.out_proj = kept


@pytest.mark.parametrize("family", ["torch_mha", "torch_mha_decoder"])
def test_prepared_torch_stack_matches(family):
    original = make_tiny(family).double()
    prepared = copy.deepcopy(original)
    prepare_mha(prepared)
    inputs = example_inputs(family, original)
    masks = [{}]
    if family == "torch_mha":
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, -3:] = True
        masks += [
            {"src_key_padding_mask": padding},
            {
                "mask": nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64),
                "is_causal": True,
            },
        ]
    for training in (False, True):
        original.train(training)
        prepared.train(training)
        for mask in masks:
            # no_grad in eval is the condition for torch's fused (nested tensor) path in the original
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                expected = original(**inputs, **mask)
                torch.manual_seed(0)
                got = prepared(**inputs, **mask)
            keep = ~mask["src_key_padding_mask"] if "src_key_padding_mask" in mask else slice(None)
            if training:  # dropout draws differ between the two implementations
                assert got.shape == expected.shape and torch.isfinite(got).all()
            else:  # the fused path leaves padded positions at zero; compare the real ones
                torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-10)


def test_prepare_is_idempotent_and_blocks_the_fused_path():
    model = make_tiny("torch_mha")
    prepare_mha(model)
    first = [m for m in model.modules() if isinstance(m, HookableMultiheadAttention)]
    prepare_mha(model)
    assert first == [m for m in model.modules() if isinstance(m, HookableMultiheadAttention)]
    assert len(first) == 2
    patch(model)  # out_proj becomes a HadamardProjection: the fused path would read its .weight
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    with torch.no_grad():
        out = model(**example_inputs("torch_mha", model), src_key_padding_mask=padding)
    assert torch.isfinite(out).all()


def test_context_length_of_every_family(family):
    """Every Hugging Face text family names its context (GPT-2 as n_positions, RoBERTa's less
    its padding offset), and the model runs a window of exactly that length; a plain torch module
    and ViT (patches, not tokens) have none, and then no --seq-len is refused."""
    from hadaconv.adapters import check_seq_len, context_length
    from hadaconv.errors import InputError

    model = make_tiny(family).eval()
    limit = context_length(model)
    if family.startswith("torch_mha") or family == "vit":
        assert limit is None
        check_seq_len(model, 10 ** 6)
        return
    check_seq_len(model, limit)
    with torch.no_grad():
        model(input_ids=torch.ones(1, limit, dtype=torch.long))
    with pytest.raises(InputError, match=f"seq_len={limit + 1} is longer than the model's context of {limit:,} tokens"):
        check_seq_len(model, limit + 1)


def test_context_length_follows_rope_scaling():
    """A scaled rotary model takes factor x the positions it was trained on; where the config
    already gives the scaled length (Llama 3.1's original_max_position_embeddings), that stands."""
    from types import SimpleNamespace

    from hadaconv.adapters import context_length

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert context_length(model(max_position_embeddings=32768, rope_scaling={"type": "yarn", "factor": 4.0})) == 131072
    assert context_length(model(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})) == 131072
    assert context_length(model(max_position_embeddings=8192, rope_scaling=None)) == 8192
