"""The fused loss and the fused head of SaEIGRPOTrainer under DDP: 2 CPU processes (gloo),
each with its own rows, through accelerate's DDP wrapper as the training loop prepares it,
for a full and a LoRA (peft) policy (tests/trl_ddp_worker.py).

Every parameter gradient after DDP's all-reduce must equal TRL's head's through the same
wrapper (the tolerance of the single-process tests), and both must equal the mean over the
ranks of each rank's own, unreduced gradient: a fused path that skipped DDP's hooks would
keep its rank's gradient, and one that reduced twice would not match either.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from saei_fast.tools.demo.processes import launch

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-fused")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    launch("trl_ddp_worker", [str(out)], 2, timeout=600, env={**os.environ, "PYTHONPATH": path})
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name, grad in ours.items():
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def mean_of_ranks(ranks: list, key: str) -> dict:
    names = ranks[0][key].keys()
    return {name: sum(record[key][name] for record in ranks) / len(ranks) for name in names}


@pytest.mark.parametrize(
    ("mode", "calls"), [("loss", "loss_calls"), ("head", "head_calls"), ("lora", "lora_calls")]
)
def test_fused_gradients_under_ddp_are_trls_after_the_all_reduce(ranks, mode, calls):
    for record in ranks:
        assert record["wrapper"] == "DistributedDataParallel"
        # The trainer's own setting without checkpointing: DDP walks the output's graph.
        assert record["find_unused_parameters"] is True
    if mode == "lora":  # only the adapters train
        assert all("lora_" in name for name in ranks[0]["fused_lora"])
        assert record[calls] == 1  # the fused path ran, once, in the wrapped forward
    # The ranks' own gradients differ (different rows), so the all-reduce is visible.
    local = [record[f"local_{mode}"] for record in ranks]
    assert any(not torch.equal(local[0][n], local[1][n]) for n in local[0])
    reduced = mean_of_ranks(ranks, f"local_{mode}")
    for record in ranks:
        assert_same_gradients(record[f"fused_{mode}"], record[f"trl_{mode}"])
        assert_same_gradients(record[f"fused_{mode}"], reduced)
        assert_same_gradients(record[f"trl_{mode}"], reduced)
