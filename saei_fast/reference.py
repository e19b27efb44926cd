"""Plain, obviously-correct PyTorch versions of every op: the test oracle and bench baseline.

Nothing here is meant to be fast or memory-light. ``*_reference`` functions compute in
float64 and are the truth the tests compare against; ``naive_*`` functions are what a
user would write in eager PyTorch, in the input's own dtype, and are the baseline of the
benchmarks and of the accuracy rule (ours must be no less accurate than naive).
"""

from __future__ import annotations

import itertools
import math
import statistics

import torch


def _apply_mask(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def entropy_reference(
    logits: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token entropy (nats) of ``softmax(logits / temperature)`` in float64.

    ``0 * log 0`` counts as 0, so ``-inf`` logits (a masked vocabulary) add nothing; a row
    of only ``-inf`` has no distribution and gives NaN, and so does a row holding a NaN or
    ``+inf`` logit (as ``-(softmax * log_softmax).sum(-1)`` gives). Masked positions give 0
    whatever their logits hold.
    """
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    # Only an exact 0 probability is dropped: a NaN one (a NaN or +inf logit anywhere in the
    # row makes the whole row NaN) must reach the sum, where ``p > 0`` would drop it.
    plogp = torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * logp)
    entropy = -plogp.sum(-1)
    entropy = torch.where(torch.isneginf(z).all(-1), torch.nan, entropy)
    return _apply_mask(entropy, mask)


def logprobs_and_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(label), entropy)`` in float64; masked positions give 0 for both."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    safe_labels = labels.long().clamp(0, logits.shape[-1] - 1)
    label_logp = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    label_logp = torch.where(torch.isneginf(z).all(-1), torch.nan, label_logp)
    entropy = entropy_reference(logits, temperature=temperature)
    return _apply_mask(label_logp, mask), _apply_mask(entropy, mask)


def naive_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Eager PyTorch entropy in the logits' own dtype: ``softmax`` and ``log_softmax`` over the
    full ``[..., V]`` tensor (several ``[N, V]`` temporaries). Gives NaN on ``-inf`` logits."""
    z = logits / temperature
    return -(torch.softmax(z, dim=-1) * torch.log_softmax(z, dim=-1)).sum(-1)


def naive_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch ``(log p(label), entropy)`` in the logits' own dtype."""
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1), entropy


def chunked_entropy(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 128
) -> torch.Tensor:
    """Entropy the way RL trainers compute it to save memory: rows in chunks of
    ``chunk_size``, each upcast to float32, ``logsumexp`` then ``sum(p * z)``."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size):
        z = chunk.float() / temperature
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


# -------------------------------------------------------------------------------------------
# Entropy-rank band selection
# -------------------------------------------------------------------------------------------


def _band_segment_starts(
    shape: tuple[int, ...], scope: str, group_size: int | None, cu_seqlens: torch.Tensor | None
) -> list[int]:
    """Flat start offsets of the scopes, plus the end: rows of ``[B, T]`` or packed sequences,
    ``group_size`` consecutive ones, or everything."""
    if cu_seqlens is None:
        rows, length = shape
        starts = [row * length for row in range(rows + 1)]
    else:
        starts = [int(offset) for offset in cu_seqlens.tolist()]
    if scope == "group":
        return starts[::group_size]
    if scope == "batch":
        return [starts[0], starts[-1]]
    return starts


def _nan_to_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def entropy_band_mask_reference(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    band: tuple[float, float] = (1 / 3, 2 / 3),
    scope: str = "sequence",
    group_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The band rule of docs/design.md by plain Python sorting.

    Within each scope (a row of ``[B, T]`` or a packed sequence of ``[N]`` + ``cu_seqlens``;
    ``group_size`` consecutive ones; or all) sort the n valid tokens by (entropy, flat
    position) and select rank r iff its midpoint lies in the band, ``lo*n <= r + 0.5 < hi*n``
    in Python (float64) arithmetic. NaN sorts above every number, as in ``torch.sort``.
    Returns bool, shaped like entropy.
    """
    values = entropy.detach().double().reshape(-1).tolist()
    valid = [True] * len(values) if mask is None else mask.reshape(-1).tolist()
    starts = _band_segment_starts(tuple(entropy.shape), scope, group_size, cu_seqlens)
    lo, hi = band
    selected = [False] * len(values)
    for start, end in itertools.pairwise(starts):
        tokens = [i for i in range(start, end) if valid[i]]
        # (is NaN, value, position): NaN compares false with everything, so it gets a flag.
        tokens.sort(key=lambda i: (math.isnan(values[i]), _nan_to_zero(values[i]), i))
        n = len(tokens)
        for rank, i in enumerate(tokens):
            selected[i] = lo * n <= rank + 0.5 < hi * n
    return torch.tensor(selected, dtype=torch.bool).reshape(entropy.shape)


def band_entropy_objective_reference(
    entropy: torch.Tensor, band_mask: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """The SaEI objective in float64, row by row: the mean, over rows (or packed sequences)
    with at least one selected token, of the row's mean selected entropy; 0 if none.
    Differentiable w.r.t. ``entropy``."""
    values = entropy.double().reshape(-1)
    selected = band_mask.reshape(-1)
    starts = _band_segment_starts(tuple(entropy.shape), "sequence", None, cu_seqlens)
    row_means = [
        values[start:end][selected[start:end]].mean()
        for start, end in itertools.pairwise(starts)
        if bool(selected[start:end].any())
    ]
    if not row_means:  # 0, still connected to entropy (zero gradient), padding left out
        return torch.where(selected, values, 0.0).sum() * 0.0
    return torch.stack(row_means).mean()


def naive_band_mask_sort(
    entropy: torch.Tensor, mask: torch.Tensor, *, band: tuple[float, float] = (1 / 3, 2 / 3)
) -> torch.Tensor:
    """Sequence-scope band mask of padded ``[B, T]`` the way one writes it in eager PyTorch:
    per-row ``torch.sort``, ranks scattered back, the midpoint rule against the valid
    counts. Assumes finite entropies (padding is sorted last as +inf)."""
    lo, hi = band
    keyed = entropy.masked_fill(~mask, float("inf"))
    order = torch.sort(keyed, dim=-1, stable=True).indices
    positions = torch.arange(entropy.shape[-1], device=entropy.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    counts = mask.sum(-1, keepdim=True).double()
    midpoints = ranks.double() + 0.5
    return mask & (counts * lo <= midpoints) & (midpoints < counts * hi)


def naive_band_mask_quantile(
    entropy: torch.Tensor, mask: torch.Tensor, *, band: tuple[float, float] = (1 / 3, 2 / 3)
) -> torch.Tensor:
    """Batch-scope thresholding with ``torch.quantile`` over the valid tokens, as trainers do
    for a global entropy percentile. Not the band rule (interpolated thresholds, ties all in
    or all out); a speed baseline. Boolean indexing syncs with the host."""
    valid = entropy[mask].float()
    levels = torch.tensor(band, dtype=valid.dtype, device=valid.device)
    low, high = torch.quantile(valid, levels)
    return mask & (entropy >= low) & (entropy < high)


# -------------------------------------------------------------------------------------------
# Entropy and log-probs from hidden states and an lm_head
# -------------------------------------------------------------------------------------------


def _linear_logits_float64(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = hidden.double() @ weight.double().t()
    return logits if bias is None else logits + bias.double()


def linear_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy of ``softmax((hidden @ weight.T + bias) / T)`` in float64, through the full
    ``[..., V]`` logits; differentiable w.r.t. hidden, weight and bias (the gradient oracle)."""
    logits = _linear_logits_float64(hidden, weight, bias)
    return entropy_reference(logits, temperature=temperature, mask=mask)


def linear_logprobs_and_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(label), entropy)`` of the linear logits in float64."""
    logits = _linear_logits_float64(hidden, weight, bias)
    return logprobs_and_entropy_reference(logits, labels, temperature=temperature, mask=mask)


def naive_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """What a user writes: ``F.linear`` to full ``[..., V]`` logits in the input dtype, then
    eager entropy (the logits and several ``[N, V]`` temporaries, kept for backward)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_entropy(logits, temperature=temperature)


def naive_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive ``(log p(label), entropy)`` through full logits in the input dtype."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_logprobs_and_entropy(logits, labels, temperature=temperature)


def chunked_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Entropy the way RL trainers fuse the lm_head to save memory (fused-linear-for-PPO
    style): chunks of tokens, each chunk's logits upcast to float32 and its entropy computed
    under activation checkpointing, so backward recomputes the chunk instead of keeping it."""
    from torch.utils.checkpoint import checkpoint

    def chunk_entropy(chunk: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(chunk, weight, bias).float() / temperature
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [checkpoint(chunk_entropy, c, use_reentrant=False) for c in flat.split(chunk_size)]
    return torch.cat(out).reshape(hidden.shape[:-1])


# -------------------------------------------------------------------------------------------
# Entropy attack on a VLM
# -------------------------------------------------------------------------------------------


def naive_attack_objective(
    model: torch.nn.Module,
    inputs: dict,
    completion_mask: torch.Tensor,
    *,
    band: tuple[float, float] = (1 / 3, 2 / 3),
    scope: str = "group",
    group_size: int | None = None,
    temperature: float = 1.0,
    band_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attack's objective the plain way: ``model(**inputs).logits`` for every position
    (full ``[B, L, V]`` logits), softmax entropy in the logits' dtype, the band rule by
    sorting (``band_mask`` given: that one), the row-mean objective. Differentiable w.r.t.
    ``inputs["pixel_values"]`` and the parameters. Returns ``(objective, band_mask)``, the
    mask ``[B, L - 1]`` over the positions that predict completion tokens."""
    logits = model(**inputs).logits[:, :-1]
    predict = completion_mask[:, 1:]
    entropy = _apply_mask(naive_entropy(logits, temperature=temperature), predict)
    if band_mask is None:
        group_scope = scope == "group" and group_size not in (None, 1)
        band_mask = entropy_band_mask_reference(
            entropy,
            predict,
            band=band,
            scope=scope if group_scope or scope == "batch" else "sequence",
            group_size=group_size if group_scope else None,
        )
    return band_entropy_objective_reference(entropy, band_mask), band_mask


# -------------------------------------------------------------------------------------------
# GRPO group advantages
# -------------------------------------------------------------------------------------------


def group_advantages_reference(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages in float64, group by group with Python's ``statistics``: ``r - mean``,
    divided by ``stdev + eps`` (unbiased) when ``scale``; a constant group gives 0."""
    values = rewards.double().tolist()
    out = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        if min(group) == max(group):
            out += [0.0] * len(group)
            continue
        mean = statistics.fmean(group)
        scale_by = statistics.stdev(group) + eps if scale else 1.0
        out += [(value - mean) / scale_by for value in group]
    return torch.tensor(out, dtype=torch.float64)
