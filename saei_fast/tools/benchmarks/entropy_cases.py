"""Entropy (+ label log-probs) from logits ``[N, V]``.

Memory-bound: the floor is reading the logits once (forward), and reading them again plus
writing their gradient (backward). Providers:

  ours            saei_fast.logprobs_and_entropy (Triton on CUDA; on a CPU the PyTorch path,
                  compiled by Inductor)
  naive           eager full softmax / log_softmax in the logits' dtype
  chunked         128-row chunks upcast to float32: entropy and the label's log-prob
  chunked-trl     TRL's published algorithm: 128-row chunks in the logits' dtype,
                  ``-(exp(log_softmax) * log_softmax).sum``; entropy only
  chunked-verl    verl's published algorithm: 2048-row chunks upcast to float32,
                  ``logsumexp - sum(softmax * logits)``; entropy only
  compiled        torch.compile of the naive version (forward and forward+backward)
  trl             TRL's own ``entropy_from_logits`` (chunked PyTorch); entropy only
  trl-triton      TRL 1.16's Triton ``selective_log_softmax_and_entropy`` (CUDA); log p +
                  entropy in one pass
  liger-ce-loss   Liger-Kernel's cross entropy: a loss without entropy, for scale
  flash-attn-ce-loss  flash-attn's Triton cross entropy: a loss without entropy, for scale
"""

from __future__ import annotations

import functools

import torch

from saei_fast.reference import chunked_entropy, naive_logprobs_and_entropy
from saei_fast.tools.benchmarks.cases import FORWARD, FORWARD_BACKWARD, OpBench, Provider

# Every provider returns its per-row outputs: ``(logprobs, entropy)``, or the entropy alone
# ("entropy only"); the checks compare them row by row, forward+backward sums them.


def _ours():
    from saei_fast.ops import logprobs_and_entropy

    return lambda logits, labels: logprobs_and_entropy(logits, labels)


def _naive(logits, labels):
    return naive_logprobs_and_entropy(logits, labels)


def _chunked(logits, labels):
    ent = chunked_entropy(logits)
    logp = torch.cat(
        [
            torch.log_softmax(chunk.float(), -1).gather(-1, lab[:, None]).squeeze(-1)
            for chunk, lab in zip(logits.split(128), labels.split(128), strict=True)
        ]
    )
    return logp, ent


def _chunked_trl_style(logits, labels):
    out = []
    for chunk in logits.split(128):
        logp = torch.log_softmax(chunk, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def _chunked_verl_style(logits, labels):
    return chunked_entropy(logits, chunk_size=2048)


@functools.cache
def _compiled():
    return torch.compile(_naive)


def _trl():
    from trl.trainer.utils import entropy_from_logits

    return lambda logits, labels: entropy_from_logits(logits)


def _trl_triton():
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    return lambda logits, labels: selective_log_softmax_and_entropy(logits, labels)


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda logits, labels: liger_cross_entropy(logits, labels, reduction="sum")


def _flash_attn():
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    return lambda logits, labels: cross_entropy_loss(logits, labels)[0].sum()


PROVIDERS = {
    p.name: p
    for p in (
        Provider("ours", _ours, kind="ours", note="log p + entropy"),
        Provider("naive", lambda: _naive, note="log p + entropy, full softmax"),
        Provider("chunked", lambda: _chunked, note="log p + entropy, 128-row fp32 chunks"),
        Provider("chunked-trl", lambda: _chunked_trl_style, note="entropy only, TRL-style"),
        Provider("chunked-verl", lambda: _chunked_verl_style, note="entropy only, verl-style"),
        Provider("compiled", _compiled, note="torch.compile(naive)", compile_calls=1),
        Provider("trl", _trl, kind="peer", note="entropy only, TRL's", module="trl"),
        Provider(
            "trl-triton",
            _trl_triton,
            kind="peer",
            note="log p + entropy, TRL's Triton kernel",
            requires_cuda=True,
            module="trl",
        ),
        Provider(
            "liger-ce-loss",
            _liger,
            kind="loss-only peer",
            note="cross-entropy loss, no entropy",
            requires_cuda=True,
            module="liger_kernel",
        ),
        Provider(
            "flash-attn-ce-loss",
            _flash_attn,
            kind="loss-only peer",
            note="cross-entropy loss, no entropy",
            requires_cuda=True,
            module="flash_attn",
        ),
    )
}


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        if quick:
            return [(8192, 151936)]
        # Real RL shapes: completion tokens of a GRPO micro-batch with the Llama-3 (128256)
        # and Qwen2 (151936, padded 152064 in Qwen2.5-VL's lm_head) vocabularies, up to 32k.
        return [(4096, 151936), (8192, 128256), (8192, 151936), (16384, 152064), (32768, 151936)]
    if quick:
        return [(128, 32000)]  # seconds for every provider on a shared 2-core CPU
    # A Llama-2-size vocabulary and Qwen's; the whole op in about a minute on 2 cores.
    return [(512, 32000), (128, 151936)]


def _build(dims, device, dtype) -> dict:
    n, v = dims
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, generator=gen).mul_(3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    return {"logits": logits, "labels": labels}


def _bytes(dims, mode, dtype) -> int:
    n, v = dims
    logits_bytes = n * v * dtype.itemsize
    # forward reads the logits once; backward reads them again and writes the gradient
    return logits_bytes if mode == FORWARD else 3 * logits_bytes


ENTROPY = OpBench(
    name="entropy",
    title="Entropy + label log-probs from logits",
    dims=("N", "V"),
    modes=(FORWARD, FORWARD_BACKWARD),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.bfloat16 if device.type == "cuda" else torch.float32,
    build=_build,
    grad_input="logits",
    bytes_moved=_bytes,
)
