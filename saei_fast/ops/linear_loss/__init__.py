"""The loss head: :func:`linear_token_loss`, a per-token loss of the label log-probs and
entropies of ``softmax((hidden @ weight.T + bias) / T)`` with its gradients formed in the
forward (3 GEMMs per token, no ``[N, V]`` logits).

It launches the linear-entropy op's kernels (``saei_fast.kernels.linear_entropy``, through
``saei_fast.ops.linear_entropy.triton_path``) and has no ``kernels/`` folder of its own.

Files: ``op`` (the public function, its autograd and the chunk loop), ``torch_path`` (a
chunk on the PyTorch path), ``triton_path`` (a chunk on the fused kernels).
"""

from saei_fast.ops.linear_loss.op import linear_token_loss

__all__ = ["linear_token_loss"]
