"""``linear_token_loss``: a per-token loss of label log-probs and entropies from hidden states
+ lm_head with its gradients taken in the forward, against float64 autograd over explicit
logits, and against the per-token op it replaces. Runs on the PyTorch path and on the fused
Triton kernels (Triton's CPU interpreter when there is no GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from gemm_counter import count_gemms
from op_helpers import DEVICE, IMPLS, INTERPRETER_WARNINGS

import saei_fast
from saei_fast.ops.linear_entropy import linear_logprobs_and_entropy

pytestmark = INTERPRETER_WARNINGS


def _inputs(token_shape, d, v, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*token_shape, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2 / math.sqrt(d))
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, token_shape, generator=gen)
    mask = torch.rand(token_shape, generator=gen) > 0.3
    mask.view(-1)[0] = True
    hidden, weight, bias = (t.to(DEVICE, dtype) for t in (hidden, weight, bias))
    return hidden, weight, bias, labels.to(DEVICE), mask.to(DEVICE)


class GRPOTokenLoss:
    """A clipped policy-gradient term with a KL penalty and an entropy bonus, per token, as
    GRPO-style trainers write it; per-token constants are gathered by ``index``."""

    def __init__(self, logprobs, seed=0, *, entropy_coef=0.01, kl_coef=0.04):
        # Old and reference log-probs near the current ones (ratios near 1, as in training),
        # so that gradients are of order 1 and the tolerances mean what they say.
        gen = torch.Generator().manual_seed(seed + 7)
        logprobs = logprobs.detach().double().reshape(-1).cpu()
        n = logprobs.numel()
        self.advantages = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE)
        noise = torch.randn(2, n, generator=gen, dtype=torch.float64)
        self.old_logprobs = (logprobs + 0.2 * noise[0]).to(DEVICE)
        self.ref_logprobs = (logprobs + 0.5 * noise[1]).to(DEVICE)
        self.weights = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
        self.entropy_coef, self.kl_coef = entropy_coef, kl_coef
        self.seen: list[torch.Tensor] = []

    @classmethod
    def near(cls, hidden, weight, bias, labels, temperature=1.0, seed=0):
        logits = (hidden.double() @ weight.double().T + bias.double()) / temperature
        logprobs = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return cls(logprobs, seed)

    def __call__(self, logprobs, entropy, index):
        self.seen.append(index)
        names = ("advantages", "old_logprobs", "ref_logprobs", "weights")
        c = {k: getattr(self, k)[index].to(logprobs.dtype) for k in names}
        ratio = torch.exp(logprobs - c["old_logprobs"])
        clipped = torch.clamp(ratio, 0.8, 1.2)
        policy = -torch.minimum(ratio * c["advantages"], clipped * c["advantages"])
        diff = c["ref_logprobs"] - logprobs
        kl = torch.exp(diff) - diff - 1
        per_token = policy + self.kl_coef * kl - self.entropy_coef * entropy
        return per_token * c["weights"]

    def of(self, logprobs, entropy):
        """The same loss over every token at once (the truth side)."""
        index = torch.arange(logprobs.numel(), device=logprobs.device)
        return self(logprobs.reshape(-1), entropy.reshape(-1), index)


def _truth(hidden, weight, bias, labels, mask, loss_fn, temperature):
    """Loss and gradients in float64 autograd over the full logits."""
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]) / temperature
    log_p = logits.log_softmax(-1)
    logprobs = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    per_token = loss_fn.of(logprobs, entropy).reshape(mask.shape)
    loss = torch.where(mask, per_token, 0.0).sum()
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _ours(hidden, weight, bias, labels, mask, loss_fn, *, impl, scale=1.0, **kw):
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(True)
        for t in (hidden, weight, bias)
    ]
    loss = saei_fast.linear_token_loss(
        leaves[0], leaves[1], labels, loss_fn, bias=leaves[2], mask=mask, impl=impl, **kw
    )
    (loss * scale).backward()
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


# Shapes ([token dims], D, V): V = 1 (H = 0, log p = 0), V = 7 below any tile, 70 rows x
# V = 130 crossing the fp32 tiles with D = 36 not a multiple of the D tile, V = 2053 prime.
SHAPES = [((2, 3), 24, 1), ((9,), 20, 7), ((2, 35), 36, 130), ((4,), 24, 2053)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("token_shape,d,v", SHAPES)
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_loss_and_all_gradients_match_float64(impl, token_shape, d, v, chunk_rows):
    hidden, weight, bias, labels, mask = _inputs(token_shape, d, v, seed=v)
    loss_fn = GRPOTokenLoss.near(hidden, weight, bias, labels, 0.7, seed=v)
    loss, grads = _ours(
        hidden, weight, bias, labels, mask, loss_fn, impl=impl, temperature=0.7,
        chunk_rows=chunk_rows,
    )  # fmt: skip
    seen = torch.cat(loss_fn.seen)
    truth, truth_grads = _truth(hidden, weight, bias, labels, mask, loss_fn, 0.7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-5)
    for name, ours, want in zip(("hidden", "weight", "bias"), grads, truth_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=2e-5, msg=name)
    # Masked tokens were never handed to the loss, every other one once.
    assert torch.equal(seen.sort().values, mask.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_as_the_per_token_op_with_the_loss_outside(impl, dtype):
    """The loss head is a faster route to what the per-token op computes when the same loss
    is written outside it: equal values and gradients in every dtype."""
    if impl == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter computes tl.dot on bfloat16 wrongly (the op refuses it)")
    token_shape, d, v = (3, 11), 32, 300
    hidden, weight, bias, labels, mask = _inputs(token_shape, d, v, dtype=dtype, seed=3)
    loss_fn = GRPOTokenLoss.near(hidden, weight, bias, labels, seed=3)
    loss, grads = _ours(hidden, weight, bias, labels, mask, loss_fn, impl=impl, chunk_rows=8)

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logprobs, entropy = linear_logprobs_and_entropy(
        leaves[0], leaves[1], labels, bias=leaves[2], mask=mask, impl=impl
    )
    per_token = loss_fn.of(logprobs.double(), entropy.double()).reshape(token_shape)
    expected = torch.where(mask, per_token, 0.0).sum()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, ours, other in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert ours.dtype == dtype, name
        torch.testing.assert_close(ours.float(), other.grad.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_rows", [None, 7, 1])
def test_three_gemms_at_any_chunk_size(impl, chunk_rows, monkeypatch):
    """Forward, grad_hidden and grad_weight for every token, whatever the chunking (the
    per-token op needs a 4th for the tokens whose logits it did not keep)."""
    n, d, v = 24, 20, 130
    hidden, weight, bias, labels, _ = _inputs((n,), d, v, seed=6)
    loss_fn = GRPOTokenLoss.near(hidden, weight, bias, labels, seed=6)

    def run():
        _ours(hidden, weight, None, labels, None, loss_fn, impl=impl, chunk_rows=chunk_rows)

    assert count_gemms(monkeypatch, run, n, d, v) == pytest.approx(3.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_and_no_grad(impl, monkeypatch):
    """A frozen lm_head gets no [V, D] gradient (2 GEMMs); without grad mode the op only
    evaluates the loss (1 GEMM) with the same value."""
    n, d, v = 12, 20, 37
    hidden, weight, bias, labels, _ = _inputs((n,), d, v, seed=8)
    loss_fn = GRPOTokenLoss.near(hidden, weight, bias, labels, seed=8)
    leaf = hidden.clone().requires_grad_(True)

    def frozen():
        saei_fast.linear_token_loss(leaf, weight, labels, loss_fn, impl=impl).backward()

    assert count_gemms(monkeypatch, frozen, n, d, v) == pytest.approx(2.0)
    assert weight.grad is None and leaf.grad is not None
    # Not even a [V, D] buffer (RSS cannot see untouched zero pages; the allocation is
    # checked where it happens).
    shapes = []
    for name in ("zeros_like", "empty_like"):
        make = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda t, make=make, **kw: shapes.append(t.shape) or make(t, **kw)
        )
    frozen()
    monkeypatch.undo()
    assert shapes and weight.shape not in shapes
    with_grad = saei_fast.linear_token_loss(leaf, weight, labels, loss_fn, impl=impl)

    def evaluate():
        with torch.no_grad():
            out = saei_fast.linear_token_loss(leaf, weight, labels, loss_fn, impl=impl)
        assert not out.requires_grad
        torch.testing.assert_close(out, with_grad.detach())

    assert count_gemms(monkeypatch, evaluate, n, d, v) == pytest.approx(1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_scales_and_a_second_backward_repeats(impl):
    hidden, weight, bias, labels, mask = _inputs((10,), 16, 40, seed=9)
    loss_fn = GRPOTokenLoss.near(hidden, weight, bias, labels, seed=9)
    _, once = _ours(hidden, weight, bias, labels, mask, loss_fn, impl=impl)
    _, scaled = _ours(hidden, weight, bias, labels, mask, loss_fn, impl=impl, scale=-2.5)
    for a, b in zip(once, scaled, strict=True):
        torch.testing.assert_close(b, -2.5 * a)
    leaf = hidden.clone().requires_grad_(True)
    loss = saei_fast.linear_token_loss(leaf, weight, labels, loss_fn, mask=mask, impl=impl)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * first)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_only_and_non_contiguous_hidden(impl):
    """No labels (the loss sees ``logprobs=None``), hidden a non-contiguous view."""
    base, weight, bias, _, _ = _inputs((3, 8), 24, 50, seed=10)
    hidden = base[:, 1:].transpose(0, 1)  # [7, 3, 24], not contiguous
    calls = []

    def entropy_bonus(logprobs, entropy, index):
        calls.append(logprobs)
        return -(index.to(entropy.dtype) + 1) * entropy

    leaf = hidden.detach().clone().requires_grad_(True)
    loss = saei_fast.linear_token_loss(leaf, weight, None, entropy_bonus, bias=bias, impl=impl)
    loss.backward()
    assert all(c is None for c in calls)
    truth_leaf = hidden.detach().double().requires_grad_(True)
    log_p = ((truth_leaf @ weight.double().T) + bias.double()).log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1).reshape(-1)
    truth = -((torch.arange(entropy.numel()) + 1).double().to(DEVICE) * entropy).sum()
    truth.backward()
    torch.testing.assert_close(loss.double(), truth.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), truth_leaf.grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_mask_and_tokens_outside_the_loss(impl):
    """No selected token: loss 0, zero gradients, the loss function never called. A token
    whose loss term is constant gets 0 gradient even with a NaN hidden state."""
    hidden, weight, _, labels, _ = _inputs((6,), 16, 30, seed=11)

    def never(logprobs, entropy, index):
        raise AssertionError("called with no tokens")

    leaf = hidden.clone().requires_grad_(True)
    head = weight.clone().requires_grad_(True)
    none = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    loss = saei_fast.linear_token_loss(leaf, head, labels, never, mask=none, impl=impl)
    loss.backward()
    assert loss.item() == 0 and not leaf.grad.any() and not head.grad.any()

    hidden[2] = torch.nan
    leaf = hidden.clone().requires_grad_(True)
    head = weight.clone().requires_grad_(True)

    def skip_token_2(logprobs, entropy, index):
        return torch.where(index == 2, 0.0, -logprobs)

    saei_fast.linear_token_loss(leaf, head, labels, skip_token_2, impl=impl).backward()
    assert torch.isfinite(head.grad).all() and torch.isfinite(leaf.grad[[0, 1, 3, 4, 5]]).all()
    assert not leaf.grad[2].any()


def test_under_torch_compile_it_runs_outside_the_graph():
    hidden, weight, _, labels, _ = _inputs((5,), 16, 30, seed=12)

    def fn(h):
        return 2 * saei_fast.linear_token_loss(h, weight, labels, lambda lp, h, i: -lp)

    eager_leaf = hidden.clone().requires_grad_(True)
    eager = fn(eager_leaf)
    eager.backward()
    leaf = hidden.clone().requires_grad_(True)
    compiled = torch.compile(fn)(leaf)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad)


@pytest.mark.parametrize(
    "token_loss,error,match",
    [
        ("not callable", TypeError, "token_loss must be callable"),
        (lambda lp, h, i: 1.0, TypeError, "must return a Tensor"),
        (lambda lp, h, i: lp > 0, TypeError, "must return a float tensor"),
        (lambda lp, h, i: lp[:1], ValueError, r"one loss per token \(\[4\]\)"),
    ],
    ids=["not-callable", "float", "bool-tensor", "wrong-shape"],
)
def test_bad_token_loss_raises_clear_errors(token_loss, error, match):
    hidden, weight, _, labels, _ = _inputs((4,), 16, 30, seed=13)
    with pytest.raises(error, match=match):
        saei_fast.linear_token_loss(hidden, weight, labels, token_loss, impl="torch")


def test_bad_tensors_are_refused_like_the_per_token_op():
    hidden, weight, _, labels, _ = _inputs((4,), 16, 30, seed=14)

    def loss(lp, h, i):
        return -lp

    with pytest.raises(ValueError, match="weight must have shape"):
        saei_fast.linear_token_loss(hidden, weight[:, :8], labels, loss)
    with pytest.raises(ValueError, match="labels"):
        saei_fast.linear_token_loss(hidden, weight, labels + 100, loss)
    with pytest.raises(ValueError, match="temperature"):
        saei_fast.linear_token_loss(hidden, weight, labels, loss, temperature=0.0)
    with pytest.raises(TypeError, match="labels"):
        saei_fast.linear_token_loss(hidden, weight, labels.float(), loss)


_MEMORY_SCRIPT = """
import json, sys, torch
import saei_fast
from saei_fast.memory import peak_memory_of
from saei_fast.reference import naive_linear_logprobs_and_entropy

torch.set_num_threads(1)
d, v = 64, 32000
gen = torch.Generator().manual_seed(0)

def peak(n, provider):
    hidden = torch.randn(n, d, generator=gen)
    weight = (torch.randn(v, d, generator=gen) / 8).requires_grad_(provider != "frozen")
    labels = torch.randint(0, v, (n,), generator=gen)

    def run():
        leaf = hidden.detach().requires_grad_(True)
        if provider == "naive":
            logp, ent = naive_linear_logprobs_and_entropy(leaf, weight, labels)
            loss = (-logp - 0.01 * ent).sum()
        else:
            loss = saei_fast.linear_token_loss(
                leaf, weight, labels, lambda lp, h, i: -lp - 0.01 * h, impl="torch",
                chunk_rows=32,
            )
        loss.backward()
        weight.grad = None

    run()  # warm-up: one-time allocations (thread pools, compiled kernels) are not the op's
    return peak_memory_of(run)

cases = [case.split(",") for case in sys.argv[1:]]
print(json.dumps({",".join(c): peak(int(c[0]), c[1]) for c in cases}))
"""


@pytest.mark.skipif(
    not __import__("saei_fast.memory").memory.rss_tracking_available(),
    reason="needs the Linux /proc RSS high-water mark",
)
def test_cpu_extra_memory_is_one_chunk_plus_the_gradients():
    """Training head (trainable lm_head, labels) on the CPU: the extra memory is the weight
    gradient plus a few [32, V] chunk buffers, and does not grow with N; a frozen head needs
    the chunks only."""
    from saei_fast.memory import run_isolated

    peaks = run_isolated(
        _MEMORY_SCRIPT, "512,naive", "128,ours", "512,ours", "512,frozen",
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    naive, small, large, frozen = peaks.values()
    weight_grad, chunk_buffer = 32000 * 64 * 4, 32 * 32000 * 4
    assert naive > 2 * 512 * 32000 * 4, peaks
    assert weight_grad < large < weight_grad + 5 * chunk_buffer + 2**20, peaks
    # 4x the rows: only the [N, D] gradient grows (96 KiB here), never a chunk.
    assert large < small + 2**20, peaks
    # A frozen lm_head: no [V, D] gradient buffer, only the chunks.
    assert chunk_buffer < frozen < large - 0.75 * weight_grad, peaks


def test_every_cpu_bench_provider_computes_the_same_gradient():
    """The timed calls of ``saei-fast bench --ops linear_loss`` must compute the same thing:
    ``hidden``'s gradient of the same loss, for every provider that runs here."""
    from saei_fast.tools.benchmarks.cases import prepare, skip_reason
    from saei_fast.tools.benchmarks.linear_loss_cases import LINEAR_LOSS
    from saei_fast.tools.benchmarks.registry import cases_for

    cpu = torch.device("cpu")
    inputs = LINEAR_LOSS.build((13, 24, 517), cpu, torch.float32)
    grads = {}
    for case in cases_for(["linear_loss"], cpu, shapes=["13x24x517"]):
        if skip_reason(case, cpu) is None:
            grads[case.provider.name] = prepare(case, inputs)().clone()
    assert {"ours-loss", "ours", "naive"} <= set(grads), grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads["naive"], atol=2e-5, rtol=1e-4, msg=name)
    assert grads["naive"].abs().max() > 1e-3  # a real gradient, not zeros
