"""Linear entropy over a vocabulary-parallel lm_head (tensor parallelism).

Shard convention: with ``R`` ranks in ``process_group``, rank ``r`` holds rows
``[offset_r, offset_r + V_r)`` of the full ``[V, D]`` weight (and bias), where the offsets
come from an all-gather of every rank's ``V_r`` in rank order, so shards may be uneven.
``hidden`` is replicated: every rank passes the same ``hidden`` (and mask, labels).

Forward: each rank computes its shard's per-row entropy ``H_r``, statistics
``(m_r, log s_r)`` (so ``lse_r = m_r / T + log s_r``) and, where it owns the label, the local
log-prob, with the single-device kernels; one all-gather of these ``[5, N]`` values lets every
rank combine them locally. Softmax over the full vocabulary is a mixture of the shard
softmaxes with weights ``pi_r = exp(lse_r - lse)``, so the exact full-vocabulary values are

    lse = log sum_r exp(lse_r)
    H   = sum_r pi_r * (H_r + lse - lse_r)          (every term >= 0: no cancellation)
    log p(label) = log p_r(label) + lse_r - lse     (r = the owner)

all evaluated relative to the global maximum logit ``M``, which also gives the global
statistics ``(M, lse - M / T)`` in the single-device format.

Backward: the gradient w.r.t. a shard's logits only needs the global ``(H, stats)``, so each
rank runs the single-device backward on its shard with the global statistics (the one-hot
term only where it owns the label), which gives its weight / bias shard gradients exactly;
the per-rank contributions to ``grad_hidden`` are summed with one all-reduce, so every rank
returns the full gradient w.r.t. its (replicated) ``hidden``.

Eager only: ``torch.compile`` does not trace the collectives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from saei_fast.ops.linear_entropy.custom_ops import linear_backward, linear_forward


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's rows sit in the full vocabulary."""

    offset: int
    local_size: int
    vocab_size: int


def shard_layout(local_size: int, process_group, device: torch.device) -> ShardLayout:
    """All-gather every rank's ``V_r`` (in rank order) to place this rank's shard.

    Raises ValueError when ``torch.distributed`` is not initialised or ``process_group`` is not
    a process group.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, got "
            f"{type(process_group).__name__}"
        )
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=process_group)
    sizes = torch.cat(sizes).tolist()
    return ShardLayout(offset=sum(sizes[:rank]), local_size=local_size, vocab_size=sum(sizes))


def _local_labels(labels: torch.Tensor | None, layout: ShardLayout):
    """Labels relative to this shard, -1 where another rank owns the label (-1 is outside
    ``[0, V_r)``: no one-hot gradient, NaN local log-prob), and the ownership mask."""
    if labels is None:
        return None, None
    local = labels.long() - layout.offset
    owned = (local >= 0) & (local < layout.local_size)
    return torch.where(owned, local, -1).contiguous(), owned


def _combine(entropy_r, logprobs_r, stats_r, owned, inv_temperature, process_group):
    """Exact full-vocabulary ``(entropy, logprobs or None, stats)`` from every rank's shard
    values (see the module docstring)."""
    label_r = torch.zeros_like(entropy_r) if owned is None else torch.where(owned, logprobs_r, 0.0)
    owned_r = torch.zeros_like(entropy_r) if owned is None else owned.to(entropy_r.dtype)
    local = torch.stack([stats_r[:, 0], stats_r[:, 1], entropy_r, label_r, owned_r])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    row_max, log_s, entropy, label, owner = torch.stack(gathered).unbind(1)  # each [R, N]

    top = row_max.amax(0)
    # Rows whose logits are all -inf everywhere have no finite maximum to shift by.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    log_share = (row_max - top) * inv_temperature + log_s  # lse_r - top / T; -inf: empty shard
    log_total = torch.logsumexp(log_share, dim=0)  # lse - top / T
    pi = torch.exp(log_share - log_total)
    # An all -inf shard has H_r = NaN and pi_r = 0: it must contribute nothing.
    terms = torch.where(pi > 0, pi * (entropy + (log_total - log_share)), 0.0)
    no_distribution = torch.isneginf(log_total)
    full_entropy = torch.where(no_distribution, torch.nan, terms.sum(0))
    stats = torch.stack([top, log_total], dim=1)
    if owned is None:
        return full_entropy, None, stats
    owner_terms = torch.where(owner > 0, label + log_share, 0.0)
    logprobs = torch.where(no_distribution, torch.nan, owner_terms.sum(0) - log_total)
    return full_entropy, logprobs, stats


class _VocabParallelLinearEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows, layout, group
    ):
        local_labels, owned = _local_labels(labels, layout)
        # No kept logits (keep = 0): the vocabulary-parallel backward recomputes its shard.
        entropy_r, logprobs_r, stats_r, _ = linear_forward(
            hidden, weight, bias, local_labels, mask, inv_temperature, impl, chunk_rows
        )
        entropy, logprobs, stats = _combine(
            entropy_r, logprobs_r, stats_r, owned, inv_temperature, group
        )
        if mask is not None:
            entropy = torch.where(mask, entropy, 0.0)
            stats = torch.where(mask.unsqueeze(1), stats, 0.0)
            logprobs = None if logprobs is None else torch.where(mask, logprobs, 0.0)
        ctx.save_for_backward(hidden, weight, bias, local_labels, mask, entropy, stats)
        ctx.inv_temperature = inv_temperature
        ctx.impl = impl
        ctx.chunk_rows = chunk_rows
        ctx.group = group
        if logprobs is None:
            # autograd.Function outputs must be tensors: return the entropy twice.
            return entropy, entropy.detach()
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_second):
        hidden, weight, bias, local_labels, mask, entropy, stats = ctx.saved_tensors
        grad_logprobs = grad_second if local_labels is not None else None
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(entropy)
        weight_grad = ctx.needs_input_grad[1]
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        grad_hidden, grad_weight, grad_bias = linear_backward(
            hidden,
            weight,
            bias,
            local_labels,
            mask,
            entropy,
            stats,
            grad_entropy,
            grad_logprobs,
            ctx.inv_temperature,
            ctx.impl,
            ctx.chunk_rows,
            weight_grad,
            bias_grad,
        )
        # hidden is replicated: its gradient is the sum of every shard's contribution.
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def vocab_parallel_linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    layout: ShardLayout,
    process_group,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(entropy, logprobs or None)`` for flat ``hidden [N, D]`` and this rank's weight shard
    (arguments already validated, ``impl`` resolved by ``dispatch.op_impl``, by the public
    functions)."""
    entropy, second = _VocabParallelLinearEntropy.apply(
        hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows, layout, process_group
    )
    return entropy, (second if labels is not None else None)
