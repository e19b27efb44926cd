"""The CPU path's per-row math written once and compiled by Inductor into fused loops.

Eager PyTorch runs the entropy math as several elementwise passes per block of rows, each its
own OpenMP region; on an oversubscribed machine every region's barrier spins. Compiled, the
forward is one parallel loop over the rows (per row: a max loop, then one loop that sums
``exp(d)`` and ``exp(d) * d``) and the backward one loop that reads each logit once and writes
its gradient once, with no ``[N, V]`` temporaries.

Each function is compiled with dynamic shapes, so a new number of rows or vocabulary size
does not recompile; Dynamo compiles it once per input dtype and layout class (contiguous rows
or strided rows, vocabulary above or below Inductor's cascade-summation size), and
``compile_counts`` reports every compilation so tests can hold it to that.

``SAEI_CPU_COMPILE`` picks the path: ``1`` compiled wherever the layout allows (an error
if compilation fails), ``0`` always eager, unset or ``auto`` compiled when Inductor works
here, else eager with one warning. Float64, one-row and overlapping layouts always run
eager. Inductor fixes the OpenMP thread count when it compiles: set
``torch.set_num_threads`` before the first call.
"""

from __future__ import annotations

import collections
import functools
import math
import warnings

import torch
from torch.fx.experimental import _config as fx_config

from saei_fast.ops.dispatch import cpu_compile_mode

# Compiled for these input dtypes; float64 (gradient checks) stays on the eager path, which
# is exact there.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_COMPILES: collections.Counter = collections.Counter()
_BROKEN: list[str] = []  # why compilation failed in "auto" mode (then eager from there on)


def compile_counts() -> dict:
    """How many times each ``(kind, dtype, vocabulary class, row layout, thread count)`` was
    compiled in this process (at most once each, unless something recompiles that should
    not)."""
    return dict(_COMPILES)


def usable(x: torch.Tensor) -> bool:
    """Whether ``x [n, V]`` (rows of logits) runs compiled. Tiny or overlapping layouts stay
    eager: Dynamo specialises sizes 0 and 1, and would recompile for them."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or torch.compiler.is_compiling():
        return False
    n, v = x.shape
    if n < 2 or v < 2 or x.stride(1) != 1 or x.stride(0) < v:
        return False
    mode = cpu_compile_mode()
    return mode == "1" or (mode == "auto" and not _BROKEN)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a tensor with no view history and the same dispatch keys whatever
    ``t`` was: Dynamo guards on a view's base and on the keys, so views of differently sized
    tensors, or tensors made under ``inference_mode``, would each compile anew."""
    with torch.inference_mode():
        alias = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return alias


# -------------------------------------------------------------------------------------------
# The math (traced by Dynamo; every tensor argument is already on the right dtype/layout)
# -------------------------------------------------------------------------------------------


def _log_smallest_f32() -> float:
    # As torch_path._log_smallest(float32), written inline so Dynamo folds a constant.
    return math.log(torch.finfo(torch.float32).smallest_normal) - 30.0


def _forward_math(x, labels, active, inv_t):
    """Entropy, label log-prob and ``(max, log sum exp(d))`` of each row of ``x [n, V]``;
    rows where ``active`` is False give 0, a label outside ``[0, V)`` a NaN log-prob."""
    v = x.shape[1]
    x = x.float()
    row_max = x.amax(dim=1, keepdim=True)
    d = (x - row_max) * inv_t  # shift before scaling, as the eager path and the kernels
    e = torch.exp(d)
    total = e.sum(dim=1)
    log_total = torch.log(total)
    mean_d = (e * d.clamp(min=_log_smallest_f32())).sum(dim=1) / total
    entropy = log_total - mean_d
    in_range = (labels >= 0) & (labels < v)
    x_label = x.gather(1, labels.clamp(0, v - 1).unsqueeze(1)).squeeze(1)
    logprobs = torch.where(in_range, (x_label - row_max.squeeze(1)) * inv_t - log_total, math.nan)
    stats = torch.stack([row_max.squeeze(1), log_total], dim=1)
    zero = torch.zeros((), dtype=entropy.dtype)
    return (
        torch.where(active, entropy, zero),
        torch.where(active, logprobs, zero),
        torch.where(active.unsqueeze(1), stats, zero),
    )


def _backward_math(
    x, labels, active, entropy, row_max, log_total, grad_entropy, grad_logprobs, inv_t
):
    """``dL/dx`` for ``L = sum(g_H * H + g_logp * logp)``, in ``x``'s dtype; rows where
    ``active`` is False, or whose upstream gradients are both 0, get exactly 0. (The
    statistics come as two vectors, not one ``[n, 2]``: Dynamo would tie a vocabulary of 2
    to that literal 2 and specialise on it.)"""
    v = x.shape[1]
    logp = (x.float() - row_max.unsqueeze(1)) * inv_t - log_total.unsqueeze(1)
    p = torch.exp(logp)
    logp = logp.clamp(min=_log_smallest_f32())
    scale = (grad_entropy * inv_t).unsqueeze(1)
    offset = (-(grad_entropy * entropy) - grad_logprobs).unsqueeze(1) * inv_t
    grad = (offset - logp * scale) * p
    cols = torch.arange(v, device=x.device)
    at_label = (cols == labels.unsqueeze(1)) & ((labels >= 0) & (labels < v)).unsqueeze(1)
    grad = torch.where(at_label, grad + (grad_logprobs * inv_t).unsqueeze(1), grad)
    live = active & ((grad_entropy != 0) | (grad_logprobs != 0))
    zero = torch.zeros((), dtype=grad.dtype)
    return torch.where(live.unsqueeze(1), grad, zero).to(x.dtype)


def _entropy_grad_math(x, inv_t):
    """Entropy of each row of ``x [n, V]`` and ``dH/dx = p * (-log p - H) / T`` (in ``x``'s
    dtype) in one go: the frozen lm_head's epilogue, where every row's upstream gradient
    is the same and the gradient is wanted while the logits are in memory."""
    x32 = x.float()
    d = (x32 - x32.amax(dim=1, keepdim=True)) * inv_t
    e = torch.exp(d)
    total = e.sum(dim=1, keepdim=True)
    d = d.clamp(min=_log_smallest_f32())
    mean_d = (e * d).sum(dim=1, keepdim=True) / total
    entropy = (torch.log(total) - mean_d).squeeze(1)
    # -log p - H = (log s - d) - (log s - mean_d) = mean_d - d
    grad = (e / total) * (mean_d - d) * inv_t
    return entropy, grad.to(x.dtype)


# -------------------------------------------------------------------------------------------
# Compilation: cached per kind; Dynamo adds one entry per dtype / layout class
# -------------------------------------------------------------------------------------------


# Inductor sums a long row with cascade summation and a short one without, and Dynamo guards
# on which: each dtype compiles once per side of this vocabulary size (and once more for rows
# that are not contiguous, whose stride Dynamo then treats as a variable).
CASCADE_VOCAB = 4096
_CALLING: list[tuple] = [()]  # the key of the call in progress, for the counting backend


# Compiles one function may legitimately need: dtypes x vocabulary classes x layouts (12), with
# room for the grad-mode and dispatch variants Dynamo guards on.
_RECOMPILE_LIMIT = 32


def _counting_backend(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    _COMPILES[_CALLING[0]] += 1
    return compile_fx(gm, example_inputs)


@functools.cache
def _compiled(kind: str):
    fn = {"forward": _forward_math, "backward": _backward_math, "entropy+grad": _entropy_grad_math}
    fn = fn[kind]
    return torch.compile(fn, backend=_counting_backend, dynamic=True, fullgraph=True)


def _run(kind: str, x: torch.Tensor, *args):
    dtype = str(x.dtype).removeprefix("torch.")
    vocab = f"V>{CASCADE_VOCAB}" if x.shape[1] > CASCADE_VOCAB else f"V<={CASCADE_VOCAB}"
    layout = "contiguous" if x.stride(0) == x.shape[1] else "row-strided"
    # Inductor's CPU code is built for the thread count at compile time, and Dynamo guards on
    # it: a process that changes torch.set_num_threads compiles once more per count.
    _CALLING[0] = (kind, dtype, vocab, layout, f"threads={torch.get_num_threads()}")
    args = tuple(_alias(a) if isinstance(a, torch.Tensor) else a for a in (x, *args))
    try:
        # The same grad mode and dispatch state every call (Dynamo guards on both; the op
        # calls in here from above and below autograd), and no duck sizing: a row count that
        # happens to equal the vocabulary size must not tie the two together.
        with (
            torch.no_grad(),
            torch._C._AutoDispatchBelowADInplaceOrView(),
            fx_config.patch(use_duck_shape=False),
            # Each (dtype, vocabulary class, layout) is one legitimate compile of the same
            # function: 3 dtypes x 2 x 2 exceed Dynamo's default limit of 8 per function,
            # after which fullgraph would fail and the path would fall back to eager.
            torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT),
        ):
            return _compiled(kind)(*args)
    except Exception as error:  # any compiler failure means "use eager"
        if cpu_compile_mode() == "1":
            raise RuntimeError(
                f"SAEI_CPU_COMPILE=1 but the CPU path could not be compiled: {error}"
            ) from error
        _BROKEN.append(f"{type(error).__name__}: {error}")
        warnings.warn(
            "saei_fast: compiling the CPU entropy path failed, using the eager path "
            f"(set SAEI_CPU_COMPILE=0 to silence this): {_BROKEN[0][:300]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _inv_t(inv_temperature: float) -> torch.Tensor:
    # A 0-dim tensor, not a float: a new temperature must not recompile.
    return torch.tensor(inv_temperature, dtype=torch.float32)


def forward(
    x: torch.Tensor, labels: torch.Tensor, active: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(entropy, logprobs, stats)`` of the rows of ``x [n, V]`` (see ``_forward_math``),
    float32; None when compilation failed (the caller then runs eager)."""
    labels = labels.long().contiguous()
    return _run("forward", x, labels, active.contiguous(), _inv_t(inv_temperature))


def entropy_and_grad(
    x: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(entropy [n] float32, dH/dx [n, V] in x's dtype)``; None when compilation failed."""
    return _run("entropy+grad", x, _inv_t(inv_temperature))


def backward(
    x: torch.Tensor,
    labels: torch.Tensor,
    active: torch.Tensor,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    inv_temperature: float,
) -> torch.Tensor | None:
    """``[n, V]`` gradient in ``x``'s dtype (see ``_backward_math``); None when compilation
    failed."""
    per_row = (entropy, stats[:, 0], stats[:, 1], grad_entropy, grad_logprobs)
    per_row = [t.float().contiguous() for t in per_row]
    labels = labels.long().contiguous()
    return _run("backward", x, labels, active.contiguous(), *per_row, _inv_t(inv_temperature))
