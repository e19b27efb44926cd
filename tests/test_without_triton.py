"""Triton is a Linux-only dependency: every public op must run its PyTorch path where Triton
cannot be imported (values and gradients, the loss head's chunking included).

The check runs in a fresh interpreter in which ``import triton`` fails, so nothing this test
session already imported can hide an import of Triton on the PyTorch path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["triton"] = None  # every `import triton` now raises ImportError

    import torch

    import saei_fast
    from saei_fast import reference

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (3, 5))
    logprobs, entropy = saei_fast.logprobs_and_entropy(logits, labels)
    true_logprobs, true_entropy = reference.logprobs_and_entropy_reference(logits, labels)
    torch.testing.assert_close(logprobs, true_logprobs)
    torch.testing.assert_close(entropy, true_entropy)
    (logprobs.sum() + entropy.sum()).backward()

    hidden = torch.randn(15, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 8, dtype=torch.float64)
    flat = labels.reshape(-1)
    logprobs, entropy = saei_fast.linear_logprobs_and_entropy(hidden, weight, flat)
    true = reference.linear_logprobs_and_entropy_reference(hidden, weight, flat)
    torch.testing.assert_close(logprobs, true[0])
    torch.testing.assert_close(entropy, true[1])
    torch.testing.assert_close(saei_fast.linear_entropy(hidden, weight), true[1])

    valid = torch.ones(3, 5, dtype=torch.bool)
    band = saei_fast.entropy_band_mask(entropy.detach().reshape(3, 5), valid)
    assert band.sum(dim=1).tolist() == [1, 1, 1], band  # 5 tokens a row: rank 2 is the middle

    loss = saei_fast.linear_token_loss(hidden, weight, flat, lambda lp, h, index: -lp)
    torch.testing.assert_close(loss, -true[0].sum().to(loss.dtype))
    loss.backward()
    assert "triton" not in {name.split(".")[0] for name, mod in sys.modules.items() if mod}
    print("ok")
    """
)


def test_public_ops_run_without_triton():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
