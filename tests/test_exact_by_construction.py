"""Exact by construction: samples and parameter uses observed, never guessed; the self-check; refusals by name.

Each model here once made the exact rule guess wrong (sequence-first inputs, a dim that merely equals N,
a parameter used outside its layer) or crash. Every rule is compared with the one-sample-at-a-time oracle
of ``tests/reference.py`` (each sample run alone through the model, in float64), with sizes that collide
(T == N) and sizes that do not.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mas_kernels as mk
from mas_kernels.estimators import VerificationError
from tests import reference as ref
from tests.helpers import HYPOTHESIS
from tests.test_exact_layers import close, no_missing


def exact_args(model, batches, dims, output_fn=lambda o: o, **kw):
    """``importance="global"`` on batches of positional arguments vs the oracle; returns the wrapper."""
    kw.setdefault("forward", lambda m, b: m(*b))
    mas = mk.MAS(model, importance="global", output_fn=output_fn, verify="always", **kw)
    mas.estimate(batches).consolidate()
    expected = ref.global_exact_args(model, batches, dims, output_fn)
    close(mas.omega, expected)
    no_missing(mas.omega, expected)
    assert mas.samples_consolidated == sum(ref._size(b, dims) for b in batches)
    return mas


def batch_args(model, batches, dims, output_fn=lambda o: o):
    mas = mk.MAS(model, importance="global_batch", output_fn=output_fn, forward=lambda m, b: m(*b))
    mas.estimate(batches).consolidate()
    close(mas.omega, ref.global_batch_args(model, batches, dims, output_fn))
    return mas


def local_count(model, batches, n):
    mas = mk.MAS(model, importance="local", forward=lambda m, b: m(*b), uncovered="skip")
    mas.estimate(batches)
    assert mas.num_samples == n
    return mas


# ------------------------------------------------------------------ models
class WordLM(nn.Module):
    """PyTorch's examples/word_language_model RNNModel (no dropout): (T, N) token ids, seq-first RNN."""

    def __init__(self, vocab=13, dim=6, hidden=5, layers=2, cell="LSTM", bidirectional=False):
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = getattr(nn, cell)(dim, hidden, layers, bidirectional=bidirectional)
        self.decoder = nn.Linear(hidden * (2 if bidirectional else 1), vocab)

    def forward(self, tokens):
        return self.decoder(self.rnn(self.encoder(tokens))[0])


class PositionalEncoding(nn.Module):
    """The nn.Transformer tutorial's sinusoidal encoding: a (max_len, 1, d) buffer added to (T, N, d)."""

    def __init__(self, d, max_len=32):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, 1, d)
        pe[:, 0, 0::2] = torch.sin(pos * div)
        pe[:, 0, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return x + self.pe[:x.size(0)]


class TransformerLM(nn.Module):
    """The nn.Transformer language-model tutorial (no dropout): (T, N) ids and a (T, T) causal mask."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.pos = PositionalEncoding(d)
        layer = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.linear = nn.Linear(d, vocab)
        self.d = d

    def forward(self, src, src_mask):
        h = self.pos(self.embedding(src) * math.sqrt(self.d))
        return self.linear(self.encoder(h, src_mask))


class MaskMixer(nn.Module):
    """(N, T, D) inputs and a (T, T) mixing matrix passed as an argument (shared by every sample)."""

    def __init__(self, d=4):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, 3)

    def forward(self, x, mask):
        return self.b(torch.tanh(mask @ self.a(x)))


class TimeMajorInside(nn.Module):
    """Batch-first outside, (T, B, C) inside: a transpose, a causal cumulative sum over time, a Linear."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Linear(c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.a(x.transpose(0, 1)).cumsum(0)  # (T, B, C)
        return self.head(torch.tanh(h)).transpose(0, 1)


class ExpertChoice(nn.Module):
    """Expert-choice routing: each expert takes the `capacity` best tokens of the whole batch (coupled)."""

    def __init__(self, d=4, experts=2, capacity=None):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.capacity = capacity

    def forward(self, x):  # (N, T, D)
        n, t, d = x.shape
        tokens = x.reshape(n * t, d)
        scores = self.router(tokens).softmax(-1)
        out = torch.zeros_like(tokens)
        cap = self.capacity or n
        for e, expert in enumerate(self.experts):
            w, idx = scores[:, e].topk(cap)
            out = out.index_add(0, idx, expert(tokens[idx]) * w[:, None])
        return out.view(n, t, d)


class ReusedLinear(nn.Module):
    """A Linear called, and its weight used again through F.linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(F.linear(h, self.fc.weight, self.fc.bias)))


class FunctionalLMHead(nn.Module):
    """A hand-written GPT's tied head: the embedding's weight reused as ``h @ wte.weight.T``."""

    def __init__(self, vocab=9, d=5):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)  # a bare parameter of the root module

    def forward(self, ids):
        h = torch.tanh(self.mix(self.wte(ids))) * self.scale
        return h @ self.wte.weight.T


class ConvReuse(nn.Module):
    """A conv called, and its weight used again through F.conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = torch.tanh(F.conv2d(h, self.conv.weight, padding=1))
        return self.head(h.mean((2, 3)))


# ------------------------------------------------------ sequence-first models
@pytest.mark.parametrize("t, n", [(5, 3), (4, 4)], ids=["T!=N", "T==N"])
@pytest.mark.parametrize("cell, bidirectional", [("LSTM", False), ("GRU", True)])
def test_word_language_model_seq_first(t, n, cell, bidirectional):
    torch.manual_seed(1)
    model = WordLM(cell=cell, bidirectional=bidirectional).eval()
    batches = [(torch.randint(0, 13, (t, n)),), (torch.randint(0, 13, (t, 2)),)]
    exact_args(model, batches, [1])
    batch_args(model, batches, [1])
    local_count(model, batches, n + 2)


@pytest.mark.parametrize("t, n", [(5, 3), (4, 4)], ids=["T!=N", "T==N"])
def test_transformer_tutorial_model_with_a_causal_mask_argument(t, n):
    model = TransformerLM().eval()
    mask = nn.Transformer.generate_square_subsequent_mask(t)
    batches = [(torch.randint(0, 11, (t, n)), mask)]
    exact_args(model, batches, [1, None])
    batch_args(model, batches, [1, None])
    local_count(model, batches, n)


@pytest.mark.parametrize("s, t, n", [(4, 3, 3), (3, 3, 3)], ids=["S!=N", "S==T==N"])
def test_nn_transformer_encoder_decoder(s, t, n):
    torch.manual_seed(2)
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=12,
                           dropout=0.0).eval()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    src, tgt = torch.randn(s, n, 8), torch.randn(t, n, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(t)
    exact_args(model, [(src, tgt, None, mask)], [1, 1, None, None],
               forward=lambda m, b: m(b[0], b[1], tgt_mask=b[3]))


# ------------------------------------------------ a dim that merely equals N
@pytest.mark.parametrize("t, n", [(3, 5), (4, 4)], ids=["T!=N", "T==N"])
def test_a_shared_t_by_t_argument(t, n):
    model = MaskMixer()
    batches = [(torch.randn(n, t, 4), torch.randn(t, t))]
    exact_args(model, batches, [0, None])
    batch_args(model, batches, [0, None])
    local_count(model, batches, n)


@pytest.mark.parametrize("t, n", [(3, 5), (4, 4)], ids=["T!=N", "T==N"])
def test_a_model_that_goes_time_major_inside(t, n):
    model = TimeMajorInside()
    exact_args(model, [(torch.randn(n, t, 4),)], [0])


@pytest.mark.parametrize("t, n", [(3, 4), (4, 4)], ids=["T!=N", "T==N"])
def test_t5_relative_attention_bias(t, n):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    model = T5EncoderModel(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=12, num_layers=2, num_heads=2,
                                    relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "T5LayerNorm":
                m.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 20, (n, t))
    out = lambda o: o.last_hidden_state  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the relative bias: per-sample fallback
        exact_args(model, [(ids,)], [0], output_fn=out)
    mas = mk.MAS(model, importance="local")
    assert mas.uncovered == []


def test_expert_choice_routing_is_refused_by_the_exact_rule_and_counted_by_the_others():
    torch.manual_seed(4)
    model = ExpertChoice().eval()
    x = torch.randn(4, 4, 4)  # capacity == N == T
    # Without the self-check the probe's second sub-batch finds the coupling (the first agrees by chance here).
    mas = mk.MAS(model, importance="global", verify=False)
    with pytest.warns(RuntimeWarning, match="not independent"):
        with pytest.raises(ValueError, match="per-sample gradient is not defined.*global_batch"):
            mas.estimate([x])
    assert mas.num_samples == 0
    # With it (the default), the self-check's samples run alone find it, before anything is committed.
    mas = mk.MAS(model, importance="global")
    with pytest.raises(VerificationError, match="not independent and a per-sample gradient is not defined.*"
                                                   "global_batch"):
        mas.estimate([x])
    assert mas.num_samples == 0
    with pytest.warns(RuntimeWarning, match="not independent"):
        batch_args(model, [(x,)], [0])


def test_batch_level_pooling_is_refused_by_name():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            h = self.a(x)
            return h - h.mean(0, keepdim=True)  # every sample's output depends on the others

    with pytest.warns(RuntimeWarning, match="not independent"):
        with pytest.raises(ValueError, match="not independent"):
            mk.MAS(Pool(), importance="global").estimate([torch.randn(5, 3)])


@settings(max_examples=10, **HYPOTHESIS)
@given(n=st.integers(2, 4), t=st.integers(2, 4), c=st.integers(2, 4), collide=st.sampled_from(["T", "C", "TC", ""]))
def test_colliding_sizes(n, t, c, collide):
    """A (T, N, C) model whose sizes collide on purpose (T == N, C == N): the samples are found in dim 1."""
    t = n if "T" in collide else t
    c = n if "C" in collide else c
    model = TimeMajorInside(c)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):  # (T, N, C) -> the batch-first model
            return self.inner(x.transpose(0, 1)).transpose(0, 1)

    m = SeqFirst()
    x = torch.randn(t, n, c)
    exact_args(m, [(x,)], [1])
    batch_args(m, [(x,)], [1])


def test_sample_dim_says_it():
    model = WordLM()
    x = torch.randint(0, 13, (5, 3))
    mas = mk.MAS(model, importance="global", sample_dim=1, verify="always").estimate([x]).consolidate()
    close(mas.omega, ref.global_exact_args(model, [(x,)], [1]))
    with pytest.raises(ValueError, match="sample_dim"):
        mk.MAS(model, sample_dim="x")
    mas = mk.MAS(MaskMixer(), importance="global", forward=lambda m, b: m(*b), sample_dim={0: 0, 1: None})
    xb, mask = torch.randn(4, 4, 4), torch.randn(4, 4)
    mas.estimate([(xb, mask)]).consolidate()
    close(mas.omega, ref.global_exact_args(mas.module, [(xb, mask)], [0, None]))


# ------------------------------------------------- uses outside their layers
@pytest.mark.parametrize("model, x", [
    (ReusedLinear(), torch.randn(5, 4)),
    (FunctionalLMHead(), torch.randint(0, 9, (4, 3))),
    (ConvReuse(), torch.randn(3, 3, 5, 5)),
], ids=["F.linear", "functional-lm-head", "F.conv2d"])
def test_parameters_used_outside_their_layers(model, x):
    with pytest.warns(RuntimeWarning, match="one backward pass per sample"):
        exact_args(model, [(x,)], [0])


def test_a_weight_norm_parametrization_with_out_features_equal_to_n():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(5, 4)  # N == out_features
    with pytest.warns(RuntimeWarning, match="one backward pass per sample"):
        mas = exact_args(model, [(x,)], [0])
    assert set(mas.tracked) >= {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"}


# ------------------------------------------------------------ the self-check
class Scale(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.weight


class WrongScaleRule(mk.Rule):
    """Deliberately wrong: per-sample gradients twice too large."""

    attrs = ("weight",)
    local_supported = False

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        c = calls[0]
        return {"weight": 2 * (c.x[lo:hi] * c.delta[lo:hi]).double()}


def test_the_self_check_catches_a_wrong_registered_rule():
    from mas_kernels.estimators.rules.base import _RULES

    mk.register_rule(Scale, WrongScaleRule())
    try:
        model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Tanh(), nn.Linear(3, 2))
        mas = mk.MAS(model, importance="global")
        with pytest.raises(VerificationError, match=r"1\.weight.*per_sample_fallback"):
            mas.estimate([torch.randn(6, 3)])
        assert mas.num_samples == 0  # nothing committed
        # the fallback the error names makes it exact
        mas = mk.MAS(model, importance="global", per_sample_fallback=["1.weight"])
        with pytest.warns(RuntimeWarning, match="per_sample_fallback"):
            mas.estimate([torch.randn(6, 3)])
        # verify=False: the check is off (and the wrong rule's values go through, as asked)
        mk.MAS(model, importance="global", verify=False).estimate([torch.randn(6, 3)])
    finally:
        _RULES.pop(Scale, None)


def test_verify_option_is_checked():
    with pytest.raises(ValueError, match="verify"):
        mk.MAS(nn.Linear(2, 2), verify="sometimes")


# ------------------------------------------------------------ float64 models
def test_float64_models_to_1e_10():
    torch.manual_seed(5)
    from tests import models

    cnn = models.randomize_norms(models.ResNetish()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    tol = dict(atol=1e-10, rtol=1e-10)
    mas = mk.MAS(cnn, importance="global").estimate([x]).consolidate()
    assert mas.omega["fc.weight"].dtype == torch.float64
    close(mas.omega, ref.global_exact(cnn, [x]), tol=tol)
    mas = mk.MAS(cnn, importance="global_batch").estimate([x]).consolidate()
    close(mas.omega, ref.global_batch(cnn, [x]), tol=tol)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xm = torch.randn(6, 4, dtype=torch.float64)
    mas = mk.MAS(mlp, importance="local").estimate([xm]).consolidate()
    close(mas.omega, ref.local_hebbian(mlp, [xm], 6), tol=tol)
    lm = WordLM().double().eval()
    ids = torch.randint(0, 13, (5, 3))
    mas = mk.MAS(lm, importance="global").estimate([ids]).consolidate()
    close(mas.omega, ref.global_exact_args(lm, [(ids,)], [1]), tol=tol)
    # the penalty of a float64 model, in float64
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lm.zero_grad(set_to_none=True)
    lm(ids).pow(2).mean().backward()
    before = {n: p.grad.clone() for n, p in lm.named_parameters()}
    value = mas.add_penalty_grad_()
    want = sum((mas.omega[n].double() * (p.detach() - mas.anchors[n]).pow(2)).sum() for n, p in lm.named_parameters())
    torch.testing.assert_close(value.double(), want, rtol=1e-12, atol=0)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.grad - before[n], 2 * mas.omega[n] * (p.detach() - mas.anchors[n]),
                                   rtol=1e-12, atol=1e-15)


# ---------------------------------------------- checkpointing, named refusals
class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.tanh(self.a(t)), torch.tanh(self.pre(x)), use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("importance", ["global", "global_batch"])
def test_reentrant_checkpointing_is_refused_by_name(importance):
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        mk.MAS(Checkpointed(True), importance=importance).estimate([x])
    model = Checkpointed(False)
    mas = mk.MAS(model, importance=importance).estimate([x]).consolidate()
    expected = ref.global_exact(model, [x]) if importance == "global" else ref.global_batch(model, [x])
    close(mas.omega, expected)


# ---------------------------------------------- transformers' norms, local rule
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "t5", "distilbert"])
def test_local_rule_covers_transformers_models(name):
    import transformers as tf

    torch.manual_seed(6)
    small = dict(vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=16)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    elif name == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**small))
    elif name == "t5":
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=12, num_layers=1,
                                              num_heads=2, dropout_rate=0.0))
    else:
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=20, dim=8, hidden_dim=12, n_layers=1, n_heads=2,
                                                       max_position_embeddings=16, dropout=0.0,
                                                       attention_dropout=0.0))
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
    mas = mk.MAS(model, importance="local")
    assert mas.uncovered == []
    ids = torch.randint(0, 20, (3, 5))
    mas.estimate([{"input_ids": ids}]).consolidate()
    expected = ref.local_hebbian(model, [{"input_ids": ids}], 3)
    norms = [n for n in expected if "norm" in n.lower() and n.endswith("weight")]
    assert norms
    close(mas.omega, expected, names=norms)


@pytest.mark.parametrize("kind", ["resnet18-reduced", "cnn-small"])
def test_the_self_check_passes_on_continual_learning_backbones(kind):
    """No false alarm from float32 round-off: the reduced ResNet-18 (BatchNorm biases summed over 1024
    positions per sample) once failed a 0.2% bound."""
    from bench.models import build

    model, batch, _, _ = build(kind, quick=True)
    model.eval()
    mas = mk.MAS(model, importance="global", verify="always")
    mas.estimate([batch, batch[:3]])
    assert mas.num_samples == batch.shape[0] + 3


def test_a_flattened_layer_with_sequences_of_another_length():
    """A Linear on ``x.view(-1, D)`` (N*T rows, sample-major): the probe sees T rows per sample; a later
    batch of another length T needs no new observation (and no new self-check) and stays exact."""
    class FlatMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):  # (N, T, 4)
            n, t, d = x.shape
            h = torch.tanh(self.a(x.reshape(n * t, d)))
            return self.b(h).view(n, t, 3)

    model = FlatMLP()
    batches = [(torch.randn(4, 3, 4),), (torch.randn(4, 5, 4),), (torch.randn(2, 6, 4),)]
    mas = exact_args(model, batches, [0])
    assert len(mas._layouts.cache) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=2),
                          st.builds(torch.zeros, st.integers(0, 3)),
                          st.lists(st.builds(torch.ones, st.integers(0, 2)), max_size=2),
                          st.dictionaries(st.text(max_size=2), st.builds(torch.ones, st.integers(0, 2)), max_size=2)),
                max_size=4),
       st.dictionaries(st.text(min_size=1, max_size=3), st.one_of(st.none(), st.floats(allow_nan=False),
                                                                 st.builds(torch.ones, st.integers(0, 2)),
                                                                 st.tuples(st.integers())), max_size=3))
def test_call_leaves_is_tree_flatten(args, kwargs):
    """The hooks' leaves of a call (no walk for tensors and plain values) are ``tree_flatten``'s, in order, and
    ``with_leaves`` puts replacements back where ``tree_unflatten`` does."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from mas_kernels.estimators.layout import call_leaves, tensor_leaves, with_leaves

    args = tuple(args)
    want = tree_flatten((args, kwargs))[0]
    got = call_leaves(args, kwargs)
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
    tensors = [t for t in want if isinstance(t, torch.Tensor)]
    assert [id(t) for t in tensor_leaves((args, kwargs))] == [id(t) for t in tensors]
    marks = [object() for _ in want]
    rebuilt = with_leaves(args, kwargs, marks)
    expected = tree_unflatten(marks, tree_flatten((args, kwargs))[1])
    assert tree_flatten(rebuilt)[1] == tree_flatten(expected)[1]
    assert all(a is b for a, b in zip(tree_flatten(rebuilt)[0], marks))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["same", "near", "far", "nan", "inf", "int", "shape", "f64"]),
                          st.integers(1, 5)), min_size=1, max_size=6), st.integers(0, 2**16))
def test_same_many_is_same_values_pair_by_pair(kinds, seed):
    """The probe's batched comparison (one synchronization) against the rule written out pair by pair in float64:
    another shape differs; integers equal exactly; floats within the dtype's tolerance of ``b``'s largest
    magnitude, or, with a NaN or an infinity, equal once those are replaced."""
    from mas_kernels.estimators.layout import same_many

    def literal(a, b):
        if a.shape != b.shape:
            return False
        if not a.dtype.is_floating_point:
            return bool(torch.equal(a, b))
        a32, b32 = a.float(), b.float()  # a's dtype (float32 here) sets the precision and the tolerance
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            return bool(torch.equal(a32.nan_to_num(), b32.nan_to_num()))
        return float((a32.double() - b32.double()).abs().max()) <= 2e-4 * max(float(b32.double().abs().max()), 1e-30)

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for kind, m in kinds:
        b = torch.randn(m, 3, generator=g)
        a = {"same": b.clone(), "near": b * (1 + 1e-6), "far": b + 1.0, "int": None, "shape": torch.randn(m, 2),
             "nan": b.clone().index_fill_(0, torch.tensor([0]), float("nan")),
             "inf": b.clone().index_fill_(0, torch.tensor([0]), float("inf")), "f64": b.double()}[kind]
        if kind == "int":
            a = b = torch.randint(0, 3, (m, 3), generator=g)
        if kind == "f64":
            b = b.double()
        pairs.append((a, b))
    assert same_many(pairs) == [literal(a, b) for a, b in pairs]


def test_rows_out_of_order_on_another_rank_make_every_rank_refuse_the_same_calls():
    """A sharded model's probe decides once for every rank: when another rank's value comparison found rows out
    of order, this rank (whose rows were in order) counts no call's rows as samples either."""
    import sys

    from mas_kernels.estimators.batch import Batch, Layouts
    from mas_kernels.estimators.layout import UNKNOWN
    from mas_kernels.estimators.plan import Plan

    def another_rank_disagrees(flag):  # the AND over ranks, with another rank's "rows out of order"
        return flag and sys._getframe(1).f_code.co_name != "_calls"

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    params = dict(model.named_parameters())
    x = torch.randn(5, 3)
    for agree, unknown in ((None, False), (another_rank_disagrees, True)):
        layouts = Layouts(model, Plan(model, params), params, lambda o: o, exact=True, agree=agree)
        layout = layouts.observe(Batch(model, lambda m: m(x), (x,), {}))
        dims = [c for m in (model[0], model[2]) for c in layout.calls[id(m)]]
        assert all((c.x is UNKNOWN) == unknown for c in dims), dims


def test_the_probe_compares_every_layer_calls_values_in_one_synchronization(monkeypatch):
    """The probe's value comparison of the calls of every layer is one ``same_many`` (one host synchronization
    for the whole model, which on a GPU is one wait, not one per layer), and still finds the one layer whose
    rows the model reorders."""
    import sys

    from mas_kernels.estimators import layout as layout_mod
    from mas_kernels.estimators.batch import Batch, Layouts
    from mas_kernels.estimators.layout import UNKNOWN
    from mas_kernels.estimators.plan import Plan

    class Reorders(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            h = torch.tanh(self.b(h.flip(0))).flip(0)  # layer b sees the rows reversed
            return self.c(h)

    calls = []
    real = layout_mod.same_many

    def spy(pairs):
        calls.append((sys._getframe(1).f_code.co_name, len(pairs)))
        return real(pairs)

    monkeypatch.setattr(layout_mod, "same_many", spy)
    model = Reorders().eval()
    params = dict(model.named_parameters())
    x = torch.randn(5, 3)
    layouts = Layouts(model, Plan(model, params), params, lambda o: o, exact=True)
    layout = layouts.observe(Batch(model, lambda m: m(x), (x,), {}))
    by_rows = [n for name, n in calls if name == "_rows_checked"]
    assert len(by_rows) == 1 and by_rows[0] >= 6, calls  # three layers' inputs and outputs in one call
    assert layout.calls[id(model.b)][0].x is UNKNOWN
    assert layout.calls[id(model.a)][0].x is not UNKNOWN and layout.calls[id(model.c)][0].x is not UNKNOWN


@pytest.mark.parametrize("scripted", ["script", "trace"])
def test_a_torchscript_layer_inside_the_model(scripted):
    """A layer compiled with torch.jit (script or trace) inside an eager model: every rule runs (the parameter
    tracking reads a TorchScript module's parameter dict, which has no ``get``: an AttributeError before), and
    the exact rule gives its parameters the per-sample fallback, named in the warning (torch.func cannot re-run
    a TorchScript forward per sample), equal to the one-sample oracle."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 5)
    layer = torch.jit.script(lin) if scripted == "script" else torch.jit.trace(lin, torch.randn(2, 4))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match=r"\['0.bias', '0.weight'\].*TorchScript module"):
        mas = mk.MAS(model, importance="global").estimate([x]).consolidate()
    close(mas.omega, ref.global_exact(model, [x]))
    mk.MAS(model, importance="global_batch").estimate([x]).consolidate()
    with pytest.warns(RuntimeWarning):
        local = mk.MAS(model, importance="local").estimate([x]).consolidate()
    assert set(local.omega) == {"0.weight", "0.bias", "2.weight", "2.bias"}
