"""Entropy from hidden states and a frozen lm_head: ``hidden [N, D]``, ``weight [V, D]``.

GEMM-bound: the nominal work is ``2NDV`` FLOPs forward and ``4NDV`` forward + backward to
``hidden`` (the lm_head is frozen, as in the entropy attack); a backward that recomputes the
logits executes ``2NDV`` more, reported separately as executed TFLOP/s. Providers:

  ours            saei_fast linear entropy (fused Triton kernels on CUDA, chunked PyTorch on CPU)
  ours-chunked    CUDA: the chunked Triton path (matmul + logits kernels)
  ours-recompute  CUDA: the backward recomputes each chunk instead of taking dH/dhidden from
                  the forward
  naive           F.linear to full logits, then eager entropy
  chunked         fused-linear-for-PPO style: checkpointed token chunks, float32 entropy
  verl-linear     verl's fused linear log-prob + entropy kernels (CUDA, when installed)
  trl-chunked-logprob  TRL 1.16's fused head (``ChunkedLogProbFunction``, what its GRPO loss
                  runs): 4096-token x 32768-vocab tiles, torch ops off CUDA; it always
                  computes log p, the entropy is the loss here as for ours
  liger-flce-loss Liger-Kernel's fused linear cross entropy: a loss without entropy
  cce-loss        cut-cross-entropy's linear cross entropy: a loss without entropy
"""

from __future__ import annotations

import torch

from saei_fast.reference import chunked_linear_entropy, naive_linear_entropy
from saei_fast.tools.benchmarks.cases import FORWARD, FORWARD_BACKWARD, OpBench, Provider


def _ours(**options):
    def make():
        from saei_fast.ops.linear_entropy.op import _linear_logprobs_and_entropy_variant

        def fn(hidden, weight, labels):
            return _linear_logprobs_and_entropy_variant(hidden, weight, None, **options)[1]

        return fn

    return make


def _naive(hidden, weight, labels):
    return naive_linear_entropy(hidden, weight)


def _chunked(hidden, weight, labels):
    return chunked_linear_entropy(hidden, weight)


# TRL's GRPO loss passes this vocabulary chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_VOCAB_CHUNK = 32768


def _trl_chunked():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def fn(hidden, weight, labels):
        outputs = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("entropy",)
        )
        return outputs[1]  # the entropy, per row

    return fn


def _verl():
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def fn(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, 1.0, "none")  # (log p, entropy)

    return fn


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, labels: liger_fused_linear_cross_entropy(
        hidden, weight, labels, reduction="sum"
    )


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight, labels: linear_cross_entropy(
        hidden, weight, labels, reduction="sum"
    )


PROVIDERS = {
    p.name: p
    for p in (
        Provider("ours", _ours(), kind="ours", note="entropy"),
        Provider(
            "ours-chunked", _ours(fused=False), kind="ours", note="entropy", requires_cuda=True
        ),
        Provider(
            "ours-recompute",
            _ours(input_grad_in_forward=False),
            kind="ours",
            note="entropy",
            requires_cuda=True,
            recomputes_forward=True,
        ),
        Provider("naive", lambda: _naive, note="entropy, full logits"),
        Provider(
            "chunked", lambda: _chunked, note="entropy, checkpointed", recomputes_forward=True
        ),
        Provider(
            "verl-linear",
            _verl,
            kind="peer",
            note="log p + entropy",
            requires_cuda=True,
            module="verl",
            recomputes_forward=True,
        ),
        Provider(
            "trl-chunked-logprob",
            _trl_chunked,
            kind="peer",
            note="entropy (log p computed too), TRL's",
            module="trl",
            recomputes_forward=True,
        ),
        Provider(
            "liger-flce-loss",
            _liger,
            kind="loss-only peer",
            note="cross-entropy loss, no entropy",
            requires_cuda=True,
            module="liger_kernel",
        ),
        Provider(
            "cce-loss",
            _cce,
            kind="loss-only peer",
            note="cross-entropy loss, no entropy",
            requires_cuda=True,
            module="cut_cross_entropy",
            recomputes_forward=True,
        ),
    )
}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type == "cuda":
        # 8192 completion tokens with the lm_heads of Qwen2.5-VL-3B / -7B and Llama-3-8B.
        shapes = [(8192, 2048, 151936), (8192, 3584, 152064), (8192, 4096, 128256)]
        return shapes[:1] if quick else shapes
    # Small enough for a shared 2-core CPU.
    return [(128, 128, 32000)] if quick else [(256, 256, 32000)]


def _build(dims, device, dtype) -> dict:
    n, d, v = dims
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, d, device=device, generator=gen) * d**-0.5).to(dtype)  # frozen
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    return {"hidden": hidden, "weight": weight, "labels": labels}


def _flops(dims, mode) -> int:
    n, d, v = dims
    return 2 * n * d * v if mode == FORWARD else 4 * n * d * v


LINEAR_ENTROPY = OpBench(
    name="linear_entropy",
    title="Entropy from hidden states + frozen lm_head",
    dims=("N", "D", "V"),
    modes=(FORWARD, FORWARD_BACKWARD),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
    build=_build,
    grad_input="hidden",
    flops=_flops,
)
