"""`saei-fast bench`: the registry's cases, the tables and the CSV/JSON it writes.

Runs the command in-process on the CPU with one tiny entropy shape (fast), and checks that
the numbers in the files are consistent with each other, that every provider computes what
its table says, and that peers that cannot run here are reported as skipped with the reason.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from saei_fast.cli import main
from saei_fast.reference import linear_entropy_reference, logprobs_and_entropy_reference
from saei_fast.tools.benchmarks import OPS, Case, Provider, cases_for, skip_reason
from saei_fast.tools.benchmarks.cases import prepare

CPU = torch.device("cpu")
PROVIDERS = (
    "ours,naive,chunked,chunked-trl,chunked-verl,compiled,trl-triton,liger-ce-loss,"
    "flash-attn-ce-loss"
)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--device", "cpu", "--ops", "entropy", "--shapes", "16x2053"]
    code = main([*argv, "--providers", PROVIDERS, "--out", str(out)])
    return code, out


def test_bench_writes_consistent_csv_and_json(bench_run):
    code, out = bench_run
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    with (out / "bench.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [(r["provider"], r["mode"]) for r in csv_rows] == [
        (r["provider"], r["mode"]) for r in rows
    ]
    expected = {(p, m) for p in PROVIDERS.split(",") for m in ("forward", "forward+backward")}
    assert {(r["provider"], r["mode"]) for r in rows} == expected
    assert report["info"]["torch"] == torch.__version__
    assert report["peaks"]["copy_GBps"] > 0 and report["peaks"]["matmul_TFLOPs"] > 0

    ok = {(r["provider"], r["mode"]): r for r in rows if r["status"] == "ok"}
    cuda_only = ("loss", "trl-triton")
    assert set(ok) == {(p, m) for p, m in expected if not any(c in p for c in cuda_only)}
    for (_, mode), r in ok.items():
        assert r["shape"] == "16x2053" and r["dtype"] == "float32"
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        logits_bytes = 16 * 2053 * 4
        assert r["bytes_moved"] == (logits_bytes if mode == "forward" else 3 * logits_bytes)
        assert r["GB/s"] == pytest.approx(r["bytes_moved"] / r["median_ms"] / 1e6, rel=0.01)
        ours = ok[("ours", mode)]
        assert r["x_ours"] == pytest.approx(r["median_ms"] / ours["median_ms"], rel=0.01)
        assert r["peak_memory_MiB"] >= 0
        assert r["repeats"] == 3  # --quick on a CPU: 3 interleaved rounds
        if r["provider"] != "ours":
            overlap = r["min_ms"] <= ours["max_ms"] and ours["min_ms"] <= r["max_ms"]
            assert r["noisy"] is overlap
    csv_ours = next(r for r in csv_rows if r["provider"] == "ours" and r["mode"] == "forward")
    assert float(csv_ours["median_ms"]) == ok[("ours", "forward")]["median_ms"]
    assert csv_ours["device"] == report["info"]["device"]


def test_missing_peers_are_skipped_with_reason(bench_run):
    _, out = bench_run
    rows = json.loads((out / "bench.json").read_text())["rows"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} == {"liger-ce-loss", "flash-attn-ce-loss", "trl-triton"}
    for r in skipped:
        assert "runs only on CUDA" in r["reason"]
        assert "median_ms" not in r
        assert r["kind"] == ("peer" if r["provider"] == "trl-triton" else "loss-only peer")
    table = (out / "bench.md").read_text()
    assert "### Entropy + label log-probs from logits" in table
    assert "liger-ce-loss (forward, forward+backward): skipped:" in table


def test_shapes_can_name_their_op():
    cases = cases_for(None, CPU, shapes=["entropy:16x2053", "linear_entropy:8x4x100"])
    assert {(c.op.name, c.dims) for c in cases} == {
        ("entropy", (16, 2053)),
        ("linear_entropy", (8, 4, 100)),
    }
    both = cases_for(["entropy", "band"], CPU, shapes=["4x64"], providers=["ours"])
    assert {(c.op.name, c.dims) for c in both} == {("entropy", (4, 64))}
    band = cases_for(["band"], CPU, shapes=["4x64"], providers=["ours-sequence"])
    assert [(c.op.name, c.dims) for c in band] == [("band", (4, 64))]


def test_skip_reason_names_the_missing_package():
    op = OPS["entropy"]
    absent = Provider("absent", lambda: None, module="saei_fast_no_such_package")
    case = Case(op, absent, (4, 8), "forward")
    assert skip_reason(case, CPU) == "saei_fast_no_such_package is not installed"
    cuda_only = Provider("gpu", lambda: None, requires_cuda=True)
    assert skip_reason(Case(op, cuda_only, (4, 8), "forward"), CPU) == (
        "runs only on CUDA (this device: cpu)"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ops", "entropy,nope"], "ops must be among"),
        (["--ops", "entropy", "--shapes", "16x0"], "positive integers"),
        (["--ops", "entropy", "--providers", "ourz"], "providers must be among"),
        (["--ops", "entropy", "--shapes", "4x4x4"], "no case matches"),
        (["--ops", "entropy", "--shapes", ","], "--shapes is empty"),
        (["--ops", "entropy", "--shapes", " "], "--shapes is empty"),
        (["--ops", ",", "--shapes", "16x2053"], "--ops is empty"),
        (["--ops", "entropy", "--shapes", "nonsense"], "shape 'nonsense' is malformed"),
        (["--ops", "entropy", "--shapes", "entropy:16by2053"], "is malformed"),
        (["--ops", "entropy", "--threads", "0"], "--threads must be >= 1"),
        (["--ops", "entropy", "--busy", "-1"], "--busy must be >= 0"),
        (["--shapes", "16x2053"], "fits several ops (entropy, band, attack)"),
        (["--ops", "entropy", "--device", "tpu"], "--device must be cpu or cuda"),
        (["--ops", "band", "--shapes", "entropy:16x2053"], "names op 'entropy'"),
    ],
)
def test_bad_options_are_refused_before_timing(argv, message, capsys, tmp_path):
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("saei-fast bench: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "bench.json").exists()


def test_out_that_is_a_file_is_refused_before_any_case(capsys, tmp_path, monkeypatch):
    import saei_fast.tools.benchmarks.runner as runner

    ran = []
    monkeypatch.setattr(runner, "run_cases", lambda *a, **k: ran.append(1) or [])
    target = tmp_path / "results"
    target.write_text("not a directory")
    for out in (target, target / "sub"):
        argv = ["bench", "--device", "cpu", "--ops", "entropy", "--shapes", "4x64"]
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("saei-fast bench: error: --out") and "is a file" in err
    assert not ran


def _per_row(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (None, outputs)


def test_every_cpu_entropy_provider_computes_what_it_claims():
    """The timed calls must compute the op, row by row: a provider that returned the wrong
    thing would make a table meaningless. Every provider that runs here is checked,
    the compiled one included, against float64 at float32-level tolerance."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(19, 2053, generator=gen) * 3
    labels = torch.randint(0, 2053, (19,), generator=gen)
    ref_logp, ref_ent = logprobs_and_entropy_reference(logits.double(), labels)
    checked = set()
    for case in cases_for(["entropy"], CPU, shapes=["19x2053"]):
        if case.mode != "forward" or skip_reason(case, CPU):
            continue
        if case.provider.kind == "loss-only peer":
            continue  # a scalar loss, not per-row outputs (CUDA only anyway)
        logp, ent = _per_row(prepare(case, {"logits": logits, "labels": labels})())
        torch.testing.assert_close(ent.double(), ref_ent, atol=5e-5, rtol=1e-5, msg=case.id)
        if not case.provider.note.startswith("entropy only"):
            torch.testing.assert_close(logp.double(), ref_logp, atol=5e-5, rtol=1e-5)
        else:
            assert logp is None, case.id
        checked.add(case.provider.name)
    expected = {"ours", "naive", "chunked", "chunked-trl", "chunked-verl", "compiled"}
    assert expected <= checked, checked
    assert "trl" in checked or importlib.util.find_spec("trl") is None


def test_every_cpu_linear_provider_computes_what_it_claims():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(13, 24, generator=gen)
    weight = torch.randn(517, 24, generator=gen) * 24**-0.5
    labels = torch.randint(0, 517, (13,), generator=gen)
    truth = linear_entropy_reference(hidden.double(), weight.double())
    checked = set()
    for case in cases_for(["linear_entropy"], CPU, shapes=["13x24x517"]):
        if case.mode != "forward" or skip_reason(case, CPU) or "loss" in case.provider.kind:
            continue
        inputs = {"hidden": hidden, "weight": weight, "labels": labels}
        _, ent = _per_row(prepare(case, inputs)())
        torch.testing.assert_close(ent.double(), truth, atol=5e-5, rtol=1e-5, msg=case.id)
        checked.add(case.provider.name)
    assert {"ours", "naive", "chunked"} <= checked, checked
    assert "trl-chunked-logprob" in checked or importlib.util.find_spec("trl") is None


def test_registry_shapes_and_work_formulas():
    for name, op in OPS.items():
        for device_quick in ((CPU, True), (CPU, False), (torch.device("cuda"), False)):
            shapes = op.shapes(*device_quick)
            assert shapes and all(len(s) == len(op.dims) for s in shapes), name
    entropy, linear = OPS["entropy"], OPS["linear_entropy"]
    cuda = entropy.shapes(torch.device("cuda"), False)
    assert max(n for n, _ in cuda) == 32768 and {v for _, v in cuda} == {128256, 151936, 152064}
    assert entropy.bytes_moved((8, 10), "forward+backward", torch.bfloat16) == 3 * 8 * 10 * 2
    assert linear.flops((8, 4, 10), "forward") == 2 * 8 * 4 * 10
    assert linear.flops((8, 4, 10), "forward+backward") == 4 * 8 * 4 * 10
