"""The computation behind :func:`saei_fast.linear_token_loss`: a per-token loss of the label
log-probs and entropies of ``softmax((hidden @ weight.T + bias) / T)``, summed, and its
gradients, taken during the forward. Plain tensors, no autograd.

When the loss is a sum of per-token terms, each token's upstream gradient
``(dL/dlogp, dL/dH)`` is known as soon as that token's log-prob and entropy are, so the
gradient w.r.t. a chunk's logits can be formed while those logits are still in memory:

    per chunk of rows:  logits (GEMM 1, kept)  ->  logp, H  ->  token_loss  ->  dL/dlogp, dL/dH
                        ->  dL/dlogits over the kept logits  ->  grad_hidden = g @ W (GEMM 2)
                        ->  grad_weight += g.T @ hidden (GEMM 3)

Three GEMMs per row whatever N is, with one ``[c, V]`` chunk in memory: the per-token op
(``linear_entropy``) cannot know its upstream gradient before its backward, so it keeps one
chunk of logits and recomputes the rest (up to 4 GEMMs per row). The caller scales the
gradients by the loss's upstream gradient (a scalar) in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saei_fast.ops import _linear_torch, _torch_entropy
from saei_fast.ops._linear_chunks import chunk_logits, chunks
from saei_fast.ops._linear_paths import chunk_rows_for

TokenLoss = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]


def _upstream(token_loss: TokenLoss, logprobs, entropy, positions, want_grad: bool):
    """``(sum of the chunk's token losses, dL/dlogp or None, dL/dH)``: the user's loss on
    detached leaves, differentiated with autograd (a few ``[c]`` tensors)."""
    with torch.enable_grad():
        entropy = entropy.detach().requires_grad_(want_grad)
        if logprobs is not None:
            logprobs = logprobs.detach().requires_grad_(want_grad)
        losses = token_loss(logprobs, entropy, positions)
        _check_losses(losses, entropy.shape[0])
        total = losses.sum(dtype=torch.float64)
        if not (want_grad and total.requires_grad):
            zeros = torch.zeros_like(entropy)
            return total.detach(), None if logprobs is None else zeros, zeros
        leaves = [entropy] if logprobs is None else [logprobs, entropy]
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    pairs = zip(leaves, grads, strict=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in pairs]
    g_lp = None if logprobs is None else grads[0].detach()
    return total.detach(), g_lp, grads[-1].detach()


def _check_losses(losses: object, n_tokens: int) -> None:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"token_loss must return a Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"token_loss must return a float tensor, got {losses.dtype}")
    if tuple(losses.shape) not in ((), (n_tokens,)):
        raise ValueError(
            f"token_loss must return one loss per token ([{n_tokens}]) or their sum ([]), "
            f"got shape {tuple(losses.shape)}"
        )


def _chunk_stats_and_logits(impl, part, weight, bias, labels, inv_t, keep: bool, buffer):
    """``(entropy, logprobs or None, stats, logits or None)`` of one chunk of rows ``part``
    (contiguous ``[c, D]``); ``logits`` (kept for the gradient) only when ``keep``."""
    if impl == "triton":
        from saei_fast.kernels.linear_entropy import linear_entropy_fwd

        logits = buffer[: part.shape[0]] if keep else None
        h, lp, stats = linear_entropy_fwd(
            part, weight, bias, None, labels, inv_t, logits_out=logits
        )
        return h, lp, stats, logits
    logits = chunk_logits(part, weight, bias)
    # The PyTorch statistics overwrite their fp32 copy of the chunk, which is the chunk
    # itself when the GEMM already gave fp32: keep a copy for the gradient then (a 16-bit
    # chunk is copied to fp32 by the statistics anyway).
    acc = _torch_entropy.accumulation_dtype(logits.dtype)
    source = logits.clone() if keep and impl == "torch" and logits.dtype == acc else logits
    h, lp, stats = _linear_torch.chunk_forward(impl, source, labels, inv_t)
    return h, lp, stats, logits if keep else None


def _chunk_grad_logits(impl, part, weight, bias, logits, labels, h, stats, g_h, g_lp, inv_t):
    """``dL/dlogits`` of the chunk, written over its kept ``logits`` where the path can."""
    if impl == "triton":
        from saei_fast.kernels.linear_entropy import linear_entropy_grad_logits

        return linear_entropy_grad_logits(
            part, weight, bias, None, 0, labels, h, stats, g_h, g_lp, inv_t, logits,
            from_logits=True,
        )  # fmt: skip
    return _linear_torch.chunk_grad_logits(impl, logits, labels, h, stats, g_h, g_lp, inv_t)


def token_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    rows: torch.Tensor | None,
    token_loss: TokenLoss,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    grads: tuple[bool, bool, bool],
):
    """``(loss, grad_hidden, grad_weight, grad_bias)``: the sum of ``token_loss`` over the
    rows ``rows`` of ``hidden [N, D]`` (None: all), in float64, and its gradients (None where
    ``grads = (hidden, weight, bias)`` does not ask). Rows not computed get 0 gradient; a
    16-bit ``grad_weight`` is accumulated over chunks in its own dtype, as in the per-token
    op's backward."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    hidden_grad, weight_grad, bias_grad = grads
    want_grad = any(grads)
    # Every row is written when every row is computed; skipped rows must read 0.
    make = torch.empty_like if rows is None else torch.zeros_like
    grad_hidden = make(hidden) if hidden_grad else None
    grad_weight = None
    if weight_grad:  # a frozen lm_head gets no [V, D] buffer at all
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if bias_grad else None
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return loss, grad_hidden, grad_weight, _cast(grad_bias, bias)
    from saei_fast.kernels._linear_config import even_chunk_rows

    chunk_rows = even_chunk_rows(n_rows, chunk_rows_for(impl, V, hidden, chunk_rows))
    buffer = None
    if impl == "triton" and want_grad:
        buffer = torch.empty(chunk_rows, V, dtype=hidden.dtype, device=hidden.device)
    for start, index in chunks(n_rows, rows, chunk_rows):
        # One contiguous [c, D] block per chunk (a view when every row is computed): the
        # kernels and the GEMMs index it from 0.
        part = hidden[index].contiguous()
        positions = (
            index
            if rows is not None
            else torch.arange(start, start + part.shape[0], device=hidden.device)
        )
        chunk_labels = None if labels is None else labels[index].contiguous()
        h, lp, stats, logits = _chunk_stats_and_logits(
            impl, part, weight, bias, chunk_labels, inv_temperature, want_grad, buffer
        )
        total, g_lp, g_h = _upstream(token_loss, lp, h, positions, want_grad)
        loss += total
        if not want_grad:
            continue
        g = _chunk_grad_logits(
            impl, part, weight, bias, logits, chunk_labels, h, stats, g_h.to(acc).contiguous(),
            None if g_lp is None else g_lp.to(acc).contiguous(), inv_temperature,
        )  # fmt: skip
        del logits
        if grad_hidden is not None:
            grad_hidden[index] = torch.mm(g, weight)
        if grad_weight is not None:
            # A row without upstream gradient has an exact-0 gradient row; its hidden row is
            # zeroed too, so that 0 * NaN (a non-finite row left out of the loss) stays 0.
            live = g_h != 0
            if g_lp is not None:
                live |= g_lp != 0
            grad_weight.addmm_(g.t(), torch.where(live.unsqueeze(1), part, 0.0))
        if grad_bias is not None:
            grad_bias.add_(g.sum(0, dtype=acc))
        del g
    return loss, grad_hidden, grad_weight, _cast(grad_bias, bias)


def _cast(grad_bias: torch.Tensor | None, bias: torch.Tensor | None):
    return None if grad_bias is None else grad_bias.to(bias.dtype)
