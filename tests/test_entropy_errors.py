"""Bad input to the entropy ops raises a clear error before any work; non-finite logits give
the documented values."""

from __future__ import annotations

import math

import pytest
import torch

from saei_fast.ops import entropy, logprobs_and_entropy
from saei_fast.reference import entropy_reference, logprobs_and_entropy_reference, naive_entropy

LOGITS = torch.randn(2, 3, 11)
LABELS = torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"logits": LOGITS.tolist()}, TypeError, "logits must be a torch.Tensor"),
        ({"logits": LOGITS.long()}, TypeError, "logits must be float16"),
        ({"logits": torch.randn(2, 0)}, ValueError, "non-empty vocab"),
        ({"logits": torch.tensor(1.0)}, ValueError, "at least 1 dimension"),
        ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": True}, TypeError, "temperature must be a float"),
        ({"temperature": torch.tensor(1.0)}, TypeError, "temperature must be a float"),
        ({"mask": torch.ones(2, 3)}, TypeError, "mask must be a bool tensor"),
        (
            {"mask": torch.ones(3, 2, dtype=torch.bool)},
            ValueError,
            r"mask must have shape \(2, 3\)",
        ),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_entropy_rejects(kwargs, error, match):
    args = {"logits": LOGITS, **kwargs}
    logits = args.pop("logits")
    with pytest.raises(error, match=match):
        entropy(logits, **args)


@pytest.mark.parametrize(
    "labels, mask, error, match",
    [
        (LABELS.float(), None, TypeError, "labels must be an int32 or int64"),
        (LABELS[:, :2], None, ValueError, r"labels must have shape \(2, 3\)"),
        (LABELS + 11, None, ValueError, r"labels must lie in \[0, 11\)"),
        (LABELS - 1, None, ValueError, r"labels must lie in \[0, 11\)"),
        ([0, 1], None, TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_logprobs_rejects_bad_labels(labels, mask, error, match):
    with pytest.raises(error, match=match):
        logprobs_and_entropy(LOGITS, labels, mask=mask)


def test_out_of_range_labels_are_fine_where_masked():
    labels = LABELS.clone()
    labels[1, 2] = -100
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    logp, _ = logprobs_and_entropy(LOGITS, labels, mask=mask)
    assert logp[1, 2].item() == 0.0


def test_env_impl_is_validated(monkeypatch):
    monkeypatch.setenv("SAEI_IMPL", "fast")
    with pytest.raises(ValueError, match="SAEI_IMPL must be one of"):
        entropy(LOGITS)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        entropy(LOGITS, impl="triton")


def test_reference_gives_nan_for_rows_with_nan_or_inf_logits():
    """The float64 truth the fast paths are held to: a NaN or +inf logit leaves its row no
    distribution (NaN, as torch's own formula gives), while -inf logits are a masked
    vocabulary and the row's entropy is that of its finite logits."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    logits[0, 3] = math.nan
    logits[1, 5] = math.inf
    logits[2, ::2] = -math.inf
    ent = entropy_reference(logits)
    logp, ent_with_labels = logprobs_and_entropy_reference(logits, torch.ones(4, dtype=torch.long))
    assert torch.isnan(ent[:2]).all() and torch.isnan(naive_entropy(logits[:2])).all()
    assert torch.isnan(logp[:2]).all()
    torch.testing.assert_close(ent[2], naive_entropy(logits[2, 1::2]), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ent[3], naive_entropy(logits[3]), rtol=1e-12, atol=0.0)
    assert torch.equal(ent.isnan(), ent_with_labels.isnan())
    # A masked row gives 0 whatever its logits hold.
    masked = entropy_reference(logits, mask=torch.tensor([False, False, True, True]))
    assert masked[:2].tolist() == [0.0, 0.0]
