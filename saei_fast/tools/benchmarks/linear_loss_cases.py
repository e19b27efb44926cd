"""The training lm_head: a GRPO-like per-token loss of label log-probs and entropies from
``hidden [N, D]`` and a trained ``weight [V, D]``, forward and backward to both.

GEMM-bound: the nominal work is ``6NDV`` FLOPs (forward, ``grad_hidden``, ``grad_weight``).
Each call runs its own backward (``call`` mode) and returns ``hidden``'s gradient, which
every provider must agree on. Providers:

  ours-loss   :func:`saei_fast.linear_token_loss`: the gradients are formed in the forward
              while each chunk's logits are in memory, 3 GEMMs per token at any N
  ours        :func:`saei_fast.linear_logprobs_and_entropy` with the loss outside: one chunk
              of logits kept for the backward, the rest recomputed (up to 4 GEMMs)
  trl-chunked-logprob  TRL 1.16's fused head (``ChunkedLogProbFunction``, what its GRPO loss
              runs; torch ops off CUDA) with the loss outside; its backward recomputes
  naive       ``F.linear`` to full logits, log-softmax and entropy in fp32
"""

from __future__ import annotations

import torch

from saei_fast.tools.benchmarks.cases import CALL, OpBench, Provider

ENTROPY_WEIGHT = 0.01
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def _token_terms(logprobs, entropy, advantages):
    """A GRPO-like per-token loss: advantage-weighted log-probs and an entropy bonus."""
    return -(advantages * logprobs + ENTROPY_WEIGHT * entropy)


def _run(loss_of):
    """``fn(**inputs)``: fresh gradients of ``loss_of(...)`` for hidden and weight; returns
    ``hidden``'s gradient (what the providers must agree on)."""

    def fn(hidden, weight, labels, advantages):
        hidden.grad = weight.grad = None
        loss_of(hidden, weight, labels, advantages).backward()
        return hidden.grad

    return fn


def _ours_loss():
    import saei_fast

    def loss_of(hidden, weight, labels, advantages):
        def token_loss(logprobs, entropy, index):
            return _token_terms(logprobs, entropy, advantages[index])

        return saei_fast.linear_token_loss(hidden, weight, labels, token_loss)

    return _run(loss_of)


def _ours():
    import saei_fast

    def loss_of(hidden, weight, labels, advantages):
        logprobs, entropy = saei_fast.linear_logprobs_and_entropy(hidden, weight, labels)
        return _token_terms(logprobs, entropy, advantages).sum()

    return _run(loss_of)


def _trl():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def loss_of(hidden, weight, labels, advantages):
        outputs = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, TRL_VOCAB_CHUNK, None, 1.0,
            ("log_probs", "entropy"),
        )  # fmt: skip
        logprobs, entropy = outputs[0], outputs[1]
        return _token_terms(logprobs.float(), entropy.float(), advantages).sum()

    return _run(loss_of)


def _naive():
    def loss_of(hidden, weight, labels, advantages):
        log_p = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1)
        logprobs = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return _token_terms(logprobs, entropy, advantages).sum()

    return _run(loss_of)


PROVIDERS = {
    p.name: p
    for p in (
        Provider(
            "ours-loss",
            _ours_loss,
            kind="ours",
            note="linear_token_loss, 3 GEMMs",
            compare_to="ours-loss",
        ),
        Provider(
            "ours", _ours, kind="ours", note="per-token op, loss outside", compare_to="ours-loss"
        ),
        Provider(
            "trl-chunked-logprob",
            _trl,
            kind="peer",
            note="TRL's fused head, loss outside",
            module="trl",
            compare_to="ours-loss",
        ),
        Provider("naive", _naive, note="full logits", compare_to="ours-loss"),
    )
}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type == "cuda":
        # Within the per-token op's kept-logits budget (2048) and far beyond it (16384), with
        # the lm_head of Qwen2.5-VL-7B.
        shapes = [(2048, 3584, 152064), (16384, 3584, 152064)]
        return shapes[1:] if quick else shapes
    return [(128, 128, 32000)] if quick else [(512, 256, 32000)]


def _build(dims, device, dtype) -> dict:
    n, d, v = dims
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, device=device, generator=gen) * d**-0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    advantages = torch.randn(n, device=device, generator=gen)
    return {
        "hidden": hidden,
        "weight": weight.requires_grad_(True),
        "labels": labels,
        "advantages": advantages,
    }


LINEAR_LOSS = OpBench(
    name="linear_loss",
    title="Training lm_head: per-token GRPO-like loss, backward to hidden and lm_head",
    dims=("N", "D", "V"),
    modes=(CALL,),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
    build=_build,
    flops=lambda dims, mode: 6 * dims[0] * dims[1] * dims[2],
)
