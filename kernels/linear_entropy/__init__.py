"""Device code of the linear-entropy op (``saei_fast.ops.linear_entropy``) and of the loss
head that reuses its kernels (``saei_fast.ops.linear_loss``): entropy and label log-probs of
``softmax((hidden @ weight.T + bias) / T)`` fused into the lm_head GEMM, never storing the
``[N, V]`` logits.

* ``kernels``: the Triton kernels (the fused forward, the split merge, the gradient w.r.t. a
  chunk's logits) and the maths they compute;
* ``config``: launch configuration per target (tiles, warps, the persistent schedule, chunk
  rows), read by the launchers and the plans alike;
* ``launch``: the launchers ``linear_entropy_fwd`` and ``linear_entropy_grad_logits``;
* ``tma``: the opt-in TMA forward for sm_90 (kernel, device check, launcher, plans);
* ``plans``: ``benchmark_plans(target)``, what ``saei-fast kernels`` compiles.

Imports run one way: ``kernels`` and ``config`` <- ``launch`` <- ``tma`` <- ``plans``.
Nothing here reads the environment: the host's dispatch hands every choice down as
``KernelOptions`` and chooses between the default and the TMA forward.
"""
