"""Captured features == eager `output_attentions` reduced the same way, on tiny random models of every family
the design names (GQA, fp32), during `generate` and in one forward pass, including sliding windows shorter and
longer than the context and Gemma-2's attention logit softcapping. Plus: the real embedded SmolLM2, refusal of
models whose attention bypasses AttentionInterface, and bounded capture memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from at2_rag.capture.attention import CAPTURE_PREFIX, capture_attention, install_capture
from at2_rag.capture.state import CaptureState
from at2_rag.errors import UnsupportedModelError


def source_matrix(prompt_tokens: int, spans) -> torch.Tensor:
    """Dense [prompt_tokens, sources] indicator: the reference reduction, independent of the capture's."""
    matrix = torch.zeros(prompt_tokens, len(spans), dtype=torch.float32)
    for s, (a, b) in enumerate(spans):
        if b > a:
            matrix[a:b, s] = 1.0
    return matrix


TOL = 1e-4
VOCAB = 96
PROMPT_LEN = 44  # > 40 so a window of 8 is much shorter than the context
NEW_TOKENS = 7
SPANS = [(1, 9), (9, 20), (22, 22), (23, 37), (38, 43)]  # includes an empty source

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
    initializer_range=0.25,  # peaky attention, so a wrong mask or row shows up as a large difference
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

SLIDE_MIX = ["sliding_attention", "full_attention", "sliding_attention"]


def _llama(**kw):
    return LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, **COMMON, **kw)


def _qwen2(**kw):
    return Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=2, **COMMON, **kw)


def _qwen2_mixed():
    # use_sliding_window with max_window_layers=1: layer 0 full attention, layer 1 sliding (window 8)
    return Qwen2ForCausalLM, Qwen2Config(
        num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON
    )


def _qwen3(**kw):
    return Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=2, head_dim=16, **COMMON, **kw)


def _mistral(window, **kw):
    return MistralForCausalLM, MistralConfig(num_hidden_layers=2, sliding_window=window, **COMMON, **kw)


def _phi3(**kw):
    return Phi3ForCausalLM, Phi3Config(num_hidden_layers=2, **COMMON, **kw)


def _gemma2(window, layer_types=None):
    return Gemma2ForCausalLM, Gemma2Config(
        num_hidden_layers=3,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=layer_types or ["sliding_attention"] * 3,
        attn_logit_softcapping=3.0,  # small, so the softcap bends the logits for real
        final_logit_softcapping=30.0,
        **COMMON,
    )


def _gemma3(window, layer_types=None):
    return Gemma3ForCausalLM, Gemma3TextConfig(
        num_hidden_layers=3,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=layer_types or ["sliding_attention"] * 3,
        **COMMON,
    )


CASES = {
    "llama": lambda: _llama(),
    "qwen2": lambda: _qwen2(),
    "qwen2-window-8-mixed": lambda: _qwen2_mixed(),
    "qwen3": lambda: _qwen3(),
    "mistral-window-long": lambda: _mistral(4096),
    "mistral-window-8": lambda: _mistral(8),
    "phi3": lambda: _phi3(),
    "phi3-window-8": lambda: _phi3(sliding_window=8),
    "gemma2-window-long": lambda: _gemma2(4096, SLIDE_MIX),
    "gemma2-window-8-mixed": lambda: _gemma2(8, SLIDE_MIX),
    "gemma3-window-long": lambda: _gemma3(4096, SLIDE_MIX),
    "gemma3-window-8-mixed": lambda: _gemma3(8, SLIDE_MIX),
}

# Gemma-2 declares `_supports_sdpa = False` (sdpa cannot softcap), so its own implementation is eager.
EXPECTED_BASE = {"gemma2-window-long": "eager", "gemma2-window-8-mixed": "eager"}


def _build(name: str):
    cls, config = CASES[name]()
    torch.manual_seed(0)
    model = cls(config).eval()
    reference = cls(copy.deepcopy(config)).eval()
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("eager")
    assert reference.config._attn_implementation == "eager"
    return model, reference


def _reference_features(reference, ids: torch.Tensor, prompt_len: int, matrix: torch.Tensor) -> torch.Tensor:
    """Eager output_attentions, rows prompt_len-1 .. N-2, summed over each source's key tokens: [T, S, L*H]."""
    with torch.no_grad():
        out = reference(ids, output_attentions=True, use_cache=False)
    att = torch.stack(out.attentions, 0).float()  # [L, B, H, N, N]
    rows = att[:, 0, :, prompt_len - 1 : ids.shape[1] - 1, :prompt_len]  # [L, H, T, P]
    feats = torch.einsum("lhtp,ps->tslh", rows, matrix)
    return feats.reshape(feats.shape[0], feats.shape[1], -1)


def _prompt(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, PROMPT_LEN), generator=g)


def _check_base(name: str, model) -> None:
    impl = model.config._attn_implementation
    base = EXPECTED_BASE.get(name, "sdpa")
    assert impl == f"{CAPTURE_PREFIX}{base}", f"{name}: attention implementation is {impl!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_generate_capture_equals_eager(name):
    model, reference = _build(name)
    base = EXPECTED_BASE.get(name, "sdpa")
    assert model.config._attn_implementation == base
    prompt = _prompt()
    matrix = source_matrix(PROMPT_LEN, SPANS)
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        plain = model.generate(prompt, **gen)  # before capture was ever installed
    with torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN - 1) as state:
        out = model.generate(prompt, **gen)
    _check_base(name, model)
    assert torch.equal(out, plain), "capturing changed the generated tokens"
    with torch.no_grad():
        again = model.generate(prompt, **gen)  # installed but inactive: plain delegation
    assert torch.equal(again, plain)
    _check_base(name, model)

    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    got = state.features()
    assert got.shape == (1, NEW_TOKENS, len(SPANS), model.config.num_hidden_layers * model.config.num_attention_heads)
    ref = _reference_features(reference, out, PROMPT_LEN, matrix)
    assert ref.std() > 1e-3, "attention is too uniform for this comparison to mean anything"
    diff = (got[0] - ref).abs().max().item()
    assert diff < TOL, f"{name}: max abs diff {diff:.3g}"
    assert torch.all(got[0, :, 2] == 0)  # the empty source


@pytest.mark.parametrize("name", ["llama", "gemma3-window-8-mixed"])
@pytest.mark.parametrize(("block", "pack", "blocks", "loose"), [(4, 2, 2, 1), (7, 7, 1, 0)])
def test_generate_capture_across_row_blocks(name, block, pack, blocks, loose, monkeypatch):
    """Decode rows are packed ROWS_PER_PACK at a time into blocks of ROW_BLOCK steps; answers longer than one
    block, and rows still loose when the features are read, stay exact."""
    import at2_rag.capture.state as capture

    monkeypatch.setattr(capture, "ROW_BLOCK", block)  # 7 rows: the prefill's last and 6 decode steps
    monkeypatch.setattr(capture, "ROWS_PER_PACK", pack)
    model, reference = _build(name)
    prompt = _prompt()
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN - 1) as state:
        out = model.generate(prompt, **gen)
    assert len(state._row_blocks) == blocks
    assert {p.loose for p in state.pending if p is not None} == {loose}  # None: layers reduced at once
    ref = _reference_features(reference, out, PROMPT_LEN, source_matrix(PROMPT_LEN, SPANS))
    diff = (state.features()[0] - ref).abs().max().item()
    assert diff < TOL, f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_forward_capture_equals_eager(name):
    model, reference = _build(name)
    prompt = _prompt(seed=2)
    answer = torch.randint(3, VOCAB, (1, NEW_TOKENS), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([prompt, answer], dim=1)
    matrix = source_matrix(PROMPT_LEN, SPANS)
    with torch.no_grad():
        plain_logits = model(ids, use_cache=False).logits
    start = PROMPT_LEN - 1
    with torch.no_grad(), capture_attention(model, SPANS, start, start + NEW_TOKENS) as state:
        logits = model(ids, use_cache=False).logits
    _check_base(name, model)
    assert (logits - plain_logits).abs().max().item() < 1e-4, "capturing changed the forward pass"
    got = state.features()
    assert got.shape[1] == NEW_TOKENS
    ref = _reference_features(reference, ids, PROMPT_LEN, matrix)
    diff = (got[0] - ref).abs().max().item()
    assert diff < TOL, f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name", ["llama", "gemma2-window-8-mixed", "gemma3-window-8-mixed"])
def test_forward_capture_honours_an_ablation_mask(name):
    """Sources masked out through attention_mask (AT2's ablation) get exactly zero attention, as in eager."""
    model, reference = _build(name)
    ids = torch.randint(3, VOCAB, (1, PROMPT_LEN + NEW_TOKENS), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for a, b in (SPANS[1], SPANS[4]):  # ablate sources 1 and 4 (source 4 is inside the last window of 8)
        mask[0, a:b] = 0
    matrix = source_matrix(PROMPT_LEN, SPANS)
    with torch.no_grad():
        out = reference(ids, attention_mask=mask, output_attentions=True, use_cache=False)
        plain = model(ids, attention_mask=mask, use_cache=False).logits
    att = torch.stack(out.attentions, 0).float()[:, 0, :, PROMPT_LEN - 1 : -1, :PROMPT_LEN]
    ref = torch.einsum("lhtp,ps->tslh", att, matrix).reshape(NEW_TOKENS, len(SPANS), -1)
    start = PROMPT_LEN - 1
    with torch.no_grad(), capture_attention(model, SPANS, start, start + NEW_TOKENS) as state:
        logits = model(ids, attention_mask=mask, use_cache=False).logits
    got = state.features()[0]
    assert (logits - plain).abs().max().item() < 1e-4
    assert torch.all(got[:, 1] == 0) and torch.all(got[:, 4] == 0)
    assert got[:, 0].abs().sum() > 0
    assert (got - ref).abs().max().item() < TOL


def test_capture_inside_window_of_rows_only():
    """A capture window in the middle of the answer records exactly those rows."""
    model, reference = _build("mistral-window-8")
    ids = torch.randint(3, VOCAB, (1, PROMPT_LEN + NEW_TOKENS), generator=torch.Generator().manual_seed(4))
    matrix = source_matrix(PROMPT_LEN, SPANS)
    ref = _reference_features(reference, ids, PROMPT_LEN, matrix)
    with torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN + 1, PROMPT_LEN + 4) as state:
        model(ids, use_cache=False)
    got = state.features()[0]
    assert got.shape[0] == 3
    assert (got - ref[2:5]).abs().max().item() < TOL


# ---- the real embedded model ------------------------------------------------------------------------------
def test_real_model_capture_equals_eager(smollm, clone_model):
    from at2_rag import Document
    from at2_rag.prompting.render import render_prompt

    model, tokenizer = smollm
    docs = [
        Document(text="The Eiffel Tower is in Paris. It was finished in 1889.", id="a", title="Eiffel"),
        Document(text="Mount Fuji is the highest mountain in Japan.", id="b"),
        Document(text="Bananas are yellow when ripe.", id="c"),
    ]
    prompt = render_prompt(tokenizer, "When was the Eiffel Tower finished?", docs)
    spans = prompt.doc_token_spans + prompt.sentence_token_spans
    p = prompt.num_tokens
    matrix = source_matrix(p, spans)
    reference = clone_model(model)  # copy.deepcopy, tolerating an Attributor's lock on the model
    reference.set_attn_implementation("eager")
    assert reference.config._attn_implementation == "eager"

    install_capture(model)
    assert model.config._attn_implementation == f"{CAPTURE_PREFIX}sdpa"
    ids = torch.tensor([prompt.input_ids])
    n_new = 12
    with torch.no_grad(), capture_attention(model, spans, p - 1) as state:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert model.config._attn_implementation == f"{CAPTURE_PREFIX}sdpa"
    got = state.features()[0]
    ref = _reference_features(reference, out, p, matrix)
    assert got.shape == ref.shape == (n_new, len(spans), 30 * 9)
    assert (got - ref).abs().max().item() < TOL

    # one forward pass over the same answer gives the same features
    with torch.no_grad(), capture_attention(model, spans, p - 1, p - 1 + n_new) as state2:
        model(out, use_cache=False)
    assert (state2.features()[0] - ref).abs().max().item() < TOL


# ---- refusal of models that bypass AttentionInterface ------------------------------------------------------
class TinyBypassConfig(PretrainedConfig):
    model_type = "at2_tiny_bypass"

    def __init__(self, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, **kw):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        super().__init__(**kw)


class TinyBypassAttention(nn.Module):
    """Hand-written attention that never consults the attention-function registry."""

    def __init__(self, config):
        super().__init__()
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class TinyBypassModel(PreTrainedModel):
    config_class = TinyBypassConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = TinyBypassAttention(config)
        self.post_init()

    def forward(self, x):
        return self.attn(x)


def test_model_bypassing_attention_interface_is_refused():
    model = TinyBypassModel(TinyBypassConfig())
    assert TinyBypassModel._can_set_attn_implementation() is False
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        install_capture(model)
    with pytest.raises(UnsupportedModelError):
        with capture_attention(model, [(0, 2)], 3):
            pass
    assert not str(model.config._attn_implementation).startswith(CAPTURE_PREFIX)


def test_attributor_refuses_bypassing_model():
    from at2_rag import Attributor

    with pytest.raises(UnsupportedModelError):
        Attributor(TinyBypassModel(TinyBypassConfig()), tokenizer=None)


# ---- the read's unshifted softmax and its fallback ------------------------------------------------------------
@pytest.mark.parametrize("case", ["in range", "overflow", "underflow"])
def test_deferred_read_exact_beyond_exp_range(case, monkeypatch):
    """The read sums exp(score) without a max shift while denominators stay in fp32's normal range; scores that
    overflow or underflow exp take the max-shifted path and give the same shares (float64 reference)."""
    torch.manual_seed(0)
    kvh, rep, d, k_len, rows = 2, 3, 16, 40, 5
    spans = [(0, 7), (7, 20), (20, 20), (25, 40)]
    key = torch.randn(1, kvh, k_len, d)
    query = torch.randn(1, kvh * rep, rows, d)
    if case == "overflow":
        query *= 400  # scores of +-1000s
    elif case == "underflow":
        key = key * 0.05 + 1  # every key close to all-ones, every query far on the other side
        query = query * 0.05 - 20
    calls = []
    shares = CaptureState._source_shares
    monkeypatch.setattr(
        CaptureState, "_source_shares",
        lambda self, *a, shifted: calls.append(shifted) or shares(self, *a, shifted=shifted),
    )
    first = k_len - rows
    state = CaptureState(spans, first, None, num_layers=1)
    state.defer(0, query, key, first, 1.0, None, None)
    got = state.features()[0]  # [rows, S, H]
    scores = query.double() @ key.double().repeat_interleave(rep, 1).transpose(-1, -2)
    visible = torch.arange(k_len)[None, :] <= torch.arange(first, k_len)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)[0]  # [H, T, K]
    ref = (probs @ source_matrix(k_len, spans).double()).permute(1, 2, 0)  # [T, S, H]
    assert (got.double() - ref).abs().max().item() < TOL  # fp32 scores of magnitude ~300 round at ~3e-5
    assert calls == ([False] if case == "in range" else [False, True])


# ---- memory: only [T, S, H] per layer is kept ---------------------------------------------------------------
def test_capture_memory_is_bounded_on_long_forward():
    cls, config = _llama()
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    model = cls(config).eval()
    n_prompt, n_answer = 2000, 16
    spans = [(i * 100, i * 100 + 90) for i in range(20)]
    ids = torch.randint(3, VOCAB, (1, n_prompt + n_answer))
    with torch.no_grad(), capture_attention(model, spans, n_prompt - 1, n_prompt - 1 + n_answer) as state:
        model(ids, use_cache=False, logits_to_keep=1)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    n = n_prompt + n_answer
    # until read, a layer keeps only its answer rows' queries and a reference to its keys: O(N), never N x N
    for pending in state.pending:
        assert sum(q.numel() for q in pending.queries) == heads * n_answer * config.head_dim
        assert pending.keys.shape[2] == n and pending.keys.numel() < n * n / 10
    state.features()
    assert len(state.rows) == layers
    total = 0
    for per_layer in state.rows:
        assert len(per_layer) == 1  # one block of rows per layer
        assert tuple(per_layer[0].shape) == (1, n_answer, len(spans), heads)
        total += per_layer[0].numel()
    assert total == layers * n_answer * len(spans) * heads  # nothing N x N (2016^2 = 4M) is kept
    assert state.features().shape == (1, n_answer, len(spans), layers * heads)


# ---- attention backends: one registry entry each ------------------------------------------------------------
def test_backend_registry_names_every_transformers_implementation():
    """Every implementation transformers can dispatch to has an entry: sdpa and eager are wrapped, the rest fall
    back to sdpa with the reason; anything else is refused with how to switch."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from at2_rag.capture.attention import capture_base
    from at2_rag.capture.backends import capture_backends

    backends = capture_backends()
    for name in ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]:
        if name.startswith(CAPTURE_PREFIX):
            continue
        assert name in backends, f"no capture entry for transformers' {name!r}"
        assert capture_base(name) in ("sdpa", "eager")
        assert backends[name].kernel is not None or backends[name].reason
    assert capture_base("flash_attention_2") == "sdpa" and capture_base("eager") == "eager"
    with pytest.raises(UnsupportedModelError, match=r"'my_kernel'.*set_attn_implementation\('sdpa'\)"):
        capture_base("my_kernel")


def test_flex_attention_model_is_switched_to_sdpa_capture_and_stays_exact(caplog):
    model, reference = _build("llama")
    model.set_attn_implementation("flex_attention")
    prompt = _prompt()
    with caplog.at_level("WARNING", logger="at2_rag.capture.attention"), torch.no_grad():
        with capture_attention(model, SPANS, PROMPT_LEN - 1) as state:
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
    assert "'flex_attention' cannot be captured" in caplog.text and "set_attn_implementation" in caplog.text
    assert model.config._attn_implementation == f"{CAPTURE_PREFIX}sdpa"
    ref = _reference_features(reference, out, PROMPT_LEN, source_matrix(PROMPT_LEN, SPANS))
    assert (state.features()[0] - ref).abs().max().item() < TOL


def test_unregistered_attention_implementation_is_refused():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register("at2_test_custom", ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register("at2_test_custom", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model, _ = _build("llama")
    model.set_attn_implementation("at2_test_custom")
    with pytest.raises(UnsupportedModelError, match="'at2_test_custom' has no capture backend"):
        install_capture(model)
    assert model.config._attn_implementation == "at2_test_custom"  # left as it was


def test_timed_capture_clocks_every_phase_without_changing_results():
    from at2_rag.capture.attention import CaptureTimings, timed_capture

    model, _ = _build("llama")
    prompt = _prompt()
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN - 1) as state:
        out = model.generate(prompt, **gen)
    plain = state.features()
    timings = CaptureTimings()
    with timed_capture(timings), torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN - 1) as state:
        timed_out = model.generate(prompt, **gen)
        timed = state.features()
    assert torch.equal(out, timed_out) and torch.equal(plain, timed)
    layers = model.config.num_hidden_layers
    assert timings.calls == layers * NEW_TOKENS  # one prefill and NEW_TOKENS - 1 decode steps per layer
    assert 0 < timings.kernel < timings.attention and timings.read > 0 and timings.release > 0
    with torch.no_grad(), capture_attention(model, SPANS, PROMPT_LEN - 1):
        model.generate(prompt, **gen)
    assert timings.calls == layers * NEW_TOKENS  # nothing clocked outside the block
