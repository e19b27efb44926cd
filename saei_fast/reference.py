"""Plain, obviously-correct PyTorch versions of every op: the test oracle and bench baseline.

Nothing here is meant to be fast or memory-light. ``*_reference`` functions compute in
float64 and are the truth the tests compare against; ``naive_*`` functions are what a
user would write in eager PyTorch, in the input's own dtype, and are the baseline of the
benchmarks and of the accuracy rule (ours must be no less accurate than naive).
"""

from __future__ import annotations

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
    of only ``-inf`` has no distribution and gives NaN. Masked positions give 0.
    """
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=p.dtype, device=p.device))
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
