"""The linear-entropy op: differentiable per-token entropy and label log-probs straight from
hidden states and an lm_head, ``softmax((hidden @ weight.T + bias) / T)``, without building
``[N, V]`` logits.

Files:

* ``op``: the public functions (:func:`linear_entropy`, :func:`linear_logprobs_and_entropy`),
  their argument checks, and the private hook benchmarks and tests use for the internal
  variants (``_linear_logprobs_and_entropy_variant``);
* ``custom_ops``: the torch.library custom ops and their autograd, and the forward /
  backward / frozen-head computations they run (shared with ``vocab_parallel``);
* ``torch_path``: chunks of materialised logits (the PyTorch path, and the loop of the
  chunked Triton variant);
* ``triton_path``: the fused Triton kernels' launches (``saei_fast.kernels.linear_entropy``),
  with the options of the dispatch and the choice of the TMA forward;
* ``chunks``: chunk sizing, selected rows and a chunk's logits, shared by every path and by
  the loss head (``saei_fast.ops.linear_loss``);
* ``vocab_parallel``: the op over a vocabulary-parallel lm_head (tensor parallelism).

Memory bound: only chunks of rows are ever turned into logits:

* forward, Triton (CUDA): none at all when no gradient is needed; the GEMM epilogue keeps
  online statistics. When a backward will follow, the logits of one chunk of rows are kept
  for it (3 GEMMs in all for those rows instead of 4). A loss that is a sum of per-token
  terms can go through ``linear_token_loss`` instead, which forms the gradient in the
  forward: 3 GEMMs for every row.
* forward, PyTorch path (and the chunked Triton variant kept for benchmarks): one ``[c, V]``
  logits chunk at a time.
* backward: the chunk's logits are read back (kept) or recomputed and turned into the
  chunk's gradient w.r.t. the logits, then ``grad_hidden[chunk] = g @ weight`` and, only when
  ``weight`` / ``bias`` require grad, ``grad_weight += g.T @ hidden[chunk]`` /
  ``grad_bias += g.sum(0)``. A frozen lm_head gets no ``[V, D]`` gradient, computed or
  allocated.
* the entropy attack's case (entropy only, frozen lm_head, ``hidden`` requires grad): the
  forward turns each chunk's logits into ``dH/dhidden`` while they are in memory and the
  backward is a per-row scaling: two GEMMs in all.

Peak extra memory is about one chunk budget + ``O(N * D)`` (plus ``[V, D]`` when the weight
requires grad), whatever N is. Masked tokens cost nothing; in the backward a row whose
upstream gradients are all 0 is treated as masked (see ``custom_ops``).
"""

from saei_fast.ops.linear_entropy.op import linear_entropy, linear_logprobs_and_entropy

__all__ = ["linear_entropy", "linear_logprobs_and_entropy"]
