"""`saei-fast bench --ops loss_head`: one GRPO loss pass of a tiny VLM through TRL's fused head
and saei-fast's, with peak memory; both heads compute what the full-logits pass computes."""

from __future__ import annotations

import json

import pytest
import torch

from saei_fast.benchmarks import OPS
from saei_fast.cli import main

CPU = torch.device("cpu")
# Two rows of four completion tokens, an odd vocabulary (not a multiple of any tile).
SHAPE = (2, 4, 2053)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_times_both_heads_with_peak_memory(tmp_path):
    argv = ["bench", "--quick", "--device", "cpu", "--ops", "loss_head"]
    assert main([*argv, "--shapes", "loss_head:2x4x2053", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["ours", "trl-head", "naive"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["shape"] == "2x4x2053" and row["mode"] == "call"
        assert row["median_ms"] > 0 and row["peak_memory_MiB"] > 0
        assert row["completion_tokens"] == 8
    ours, trl = rows[0], rows[1]
    assert trl["x_ours"] == pytest.approx(trl["median_ms"] / ours["median_ms"], rel=0.02)


def test_both_heads_compute_the_full_logits_values_and_gradients():
    op = OPS["loss_head"]
    torch.manual_seed(0)
    inputs = op.build(SHAPE, CPU, torch.float32)
    model = inputs["model"]
    results = {}
    for name, provider in op.providers.items():
        logps, entropy = provider.make()(**inputs)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (logps, entropy, grads)
    naive_logps, naive_entropy, naive_grads = results["naive"]
    assert naive_logps.shape == (SHAPE[0] * SHAPE[1],)
    assert (naive_entropy > 0).all()
    for name in ("ours", "trl-head"):
        logps, entropy, grads = results[name]
        torch.testing.assert_close(logps, naive_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, naive_entropy, rtol=1e-5, atol=1e-5)
        assert grads.keys() == naive_grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, naive_grads[key], rtol=1e-4, atol=1e-6, msg=key)
