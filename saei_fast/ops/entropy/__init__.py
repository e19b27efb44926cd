"""The entropy op: differentiable per-token entropy and label log-probs of
``softmax(logits / T)``, straight from logits.

- ``op``: the public functions ``entropy`` and ``logprobs_and_entropy``, their argument
  checks, the ``torch.library`` custom ops and their autograd;
- ``torch_path``: the PyTorch path (CPU tensors, float64, ``impl="torch"``), memory-light;
- ``compiled``: its per-row math compiled by Inductor (the default on a CPU);
- ``triton_path``: the Triton launch path, running the kernels of ``saei_fast.kernels.entropy``.

Import the submodules by their full path: in ``saei_fast.ops`` the name ``entropy`` is the
function.
"""

from saei_fast.ops.entropy.op import entropy, logprobs_and_entropy

__all__ = ["entropy", "logprobs_and_entropy"]
