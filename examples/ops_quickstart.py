"""The saei-fast ops on small CPU tensors: entropy and log-probs from logits, the same from
hidden states and an lm_head weight, the middle-entropy band, SaEI's objective and GRPO
advantages. On CUDA tensors the same calls run the Triton kernels.

    python examples/ops_quickstart.py
"""

import torch

import saei_fast

torch.manual_seed(0)
B, T, D, V = 4, 16, 64, 1000  # 4 responses of 16 tokens, hidden size 64, vocabulary 1000

# Entropy and label log-probs straight from logits, at the sampling temperature.
logits = torch.randn(B, T, V, requires_grad=True)
labels = torch.randint(0, V, (B, T))
mask = torch.ones(B, T, dtype=torch.bool)
mask[1, 12:] = False  # padding: returns 0, gets 0 gradient, its labels are never read
logp, H = saei_fast.logprobs_and_entropy(logits, labels, temperature=0.7, mask=mask)
(H.sum() + logp.sum()).backward()
print("entropy", tuple(H.shape), H.dtype, "mean over real tokens", float(H.detach()[mask].mean()))

# The same from hidden states and the lm_head weight, never building [B*T, V] logits.
hidden = torch.randn(B, T, D, requires_grad=True)
weight = torch.randn(V, D) / D**0.5  # a frozen head: only the hidden states get a gradient
H_lin = saei_fast.linear_entropy(hidden, weight, temperature=0.7, mask=mask)
H_lin.sum().backward()
print("linear entropy", tuple(H_lin.shape), "grad to hidden", tuple(hidden.grad.shape))

# The middle-entropy third of each group of 2 responses, and SaEI's objective.
band = saei_fast.entropy_band_mask(H.detach(), mask, scope="group", group_size=2)
objective = saei_fast.band_entropy_objective(H, band)
print("selected tokens", int(band.sum()), "of", int(mask.sum()), "objective", objective.item())

# GRPO advantages over groups of 4 responses (clean + adversarial rows of one prompt).
rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
print("advantages", saei_fast.group_advantages(rewards, group_size=4))
