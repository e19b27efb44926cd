"""No silent wrong answer, no raw traceback: a catalogue of bad, edge and hostile inputs.

Every public entry point (the ops, the pixel spaces, the attack and its config, the TRL
config and the command line) is fed inputs from the tables in ``tests/bad_inputs/``; each
entry states its outcome, a clear error (``TypeError`` / ``ValueError`` naming the argument)
or the documented value, and anything else fails. Ops that dispatch run every entry on
both paths (PyTorch, and Triton under ``TRITON_INTERPRET=1`` on a machine without a GPU),
which must also agree with each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from bad_inputs import (
    attack_cases,
    band_cases,
    cli_cases,
    config_cases,
    linear_cases,
    logits_cases,
    nonfinite_cases,
    pixel_cases,
)
from bad_inputs.core import IMPLS, Case, check_agree, check_outcome, observe

import saei_fast
from saei_fast.cli import main
from saei_fast.ops.dispatch import triton_interpreting

DISPATCHED = logits_cases.CASES + linear_cases.CASES + band_cases.BAND_CASES + nonfinite_cases.CASES
SINGLE_PATH = band_cases.CASES + pixel_cases.CASES + config_cases.CASES


def _ids(cases) -> list[str]:
    return [case.id for case in cases]


def test_catalogue_is_large_and_ids_are_unique():
    ids = _ids(
        DISPATCHED
        + SINGLE_PATH
        + config_cases.SAEI_CASES
        + attack_cases.CASES
        + list(cli_cases.CASES)
    )
    assert len(ids) == len(set(ids))
    assert len(ids) >= 100
    assert set(cli_cases.EXECUTABLE) <= set(ids)


# -------------------------------------------------------------------------------------------
# Ops, pixel spaces, configs
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", DISPATCHED, ids=_ids(DISPATCHED))
def test_dispatched_op(case: Case):
    # The Triton path takes these CPU tensors only in the interpreter (set by conftest.py
    # where there is no GPU); on a GPU machine the kernels are checked by bench/gpu_check.py.
    impls = IMPLS if triton_interpreting() else ("torch",)
    observed = {impl: observe(case, impl) for impl in impls}
    failures = []
    for impl in impls:
        try:
            check_outcome(case.outcome_for(impl), observed[impl], f"{case.id} [{impl}]")
        except AssertionError as failure:
            failures.append(str(failure))
    if not failures and len(impls) == 2:
        try:
            check_agree(case, observed)
        except AssertionError as failure:
            failures.append(str(failure))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", SINGLE_PATH, ids=_ids(SINGLE_PATH))
def test_single_path(case: Case):
    check_outcome(case.outcome, observe(case, None), case.id)


@pytest.mark.parametrize("case", config_cases.SAEI_CASES, ids=_ids(config_cases.SAEI_CASES))
def test_saei_config(case: Case):
    pytest.importorskip("trl")
    check_outcome(case.outcome, observe(case, None), case.id)
    assert not config_cases.OUTPUT_DIR.exists()


# -------------------------------------------------------------------------------------------
# entropy_attack: rejected before the first forward pass, on both paths
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attack_context() -> attack_cases.AttackContext:
    testing = pytest.importorskip("saei_fast.tools.testing")
    model = testing.tiny_qwen2_5_vl()
    processor = testing.tiny_qwen_image_processor(max_side=28)
    group_size = 2
    images = testing.random_images(2, (28, 28), seed=51)
    batch = testing.vlm_batch(model, processor, images, group_size=group_size, seed=52)
    return attack_cases.AttackContext(
        model=model,
        inputs=batch.inputs,
        completion_mask=batch.completion_mask,
        space=saei_fast.pixels.from_processor(processor),
        processor=processor,
        rows=batch.completion_mask.shape[0],
        group_size=group_size,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", attack_cases.CASES, ids=_ids(attack_cases.CASES))
def test_attack_rejects_before_any_forward(case, impl, attack_context, monkeypatch):
    monkeypatch.setenv("SAEI_IMPL", impl)
    model, inputs, completion_mask, keywords = case.arguments(attack_context)
    forwards = []
    hook = attack_context.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        saei_fast.entropy_attack(model, inputs, completion_mask, **keywords)
    except Exception as error:  # the class of the exception is what is checked
        observed = error
    else:
        observed = "a result"
    finally:
        hook.remove()
    check_outcome(case.outcome, observed, f"{case.id} [{impl}]")
    assert forwards == [], f"{case.id}: the model ran before the error"


def test_attack_state_is_untouched_by_rejected_calls(attack_context):
    # The cases above run on the shared model: none of them may leave it changed.
    model = attack_context.model
    assert not model.training
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert all(parameter.grad is None for parameter in model.parameters())


# -------------------------------------------------------------------------------------------
# The command line
# -------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
        for path in sorted(folder.rglob("*"))
    }


def _refuse_work(monkeypatch, command: str | None) -> None:
    """Make the expensive part of each command fail loudly, so that a check that lets a bad
    value through fails the test at once instead of training or compiling for minutes."""

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"saei-fast {command}: work started despite the user error")

    targets = {
        "demo": ("saei_fast.tools.demo.run.run_all",),
        "bench": (
            "saei_fast.tools.benchmarks.runner.run_cases",
            "saei_fast.tools.benchmarks.peaks.device_peaks",
        ),
        "kernels": ("saei_fast.tools.kernel_report.build.ProcessPoolExecutor",),
    }
    for target in targets.get(command, ()):
        monkeypatch.setattr(target, refuse)


def _check_cli(case: cli_cases.CliCase, status: object, out: str, err: str) -> None:
    where = f"saei-fast {' '.join(case.argv)}"
    assert "Traceback" not in err, f"{where}: traceback\n{err}"
    assert status == 2, f"{where}: exit status {status!r}, expected 2\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{where}: expected one error line on stderr, got\n{err}"
    assert lines[0].startswith(case.prefix), f"{where}: expected {case.prefix!r}..., got {err}"
    message = lines[0][len(case.prefix) :]
    assert re.search(case.names, message), f"{where}: {message!r} does not name {case.names!r}"
    assert out == "", f"{where}: printed to stdout\n{out}"


@pytest.mark.parametrize("case", cli_cases.CASES, ids=_ids(cli_cases.CASES))
def test_command_line_user_error(case, tmp_path, monkeypatch, capsys):
    values = cli_cases.prepare(tmp_path)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    _refuse_work(monkeypatch, case.command)
    try:
        status = main(cli_cases.argv(case, values))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    _check_cli(case, status, out, err)
    assert _tree(tmp_path) == before, f"{case.id}: files were created or changed"


def test_installed_executable_reports_user_errors(tmp_path):
    """The same contract through the console script ``pip install`` put on PATH (a few
    cases, run side by side: each start imports torch)."""
    executable = shutil.which("saei-fast")
    assert executable, "the saei-fast console script is not on PATH: pip install -e ."
    cases = [case for case in cli_cases.CASES if case.id in cli_cases.EXECUTABLE]
    runs = []
    for index, case in enumerate(cases):
        folder = tmp_path / str(index)
        folder.mkdir()
        values = cli_cases.prepare(folder)
        before = _tree(folder)
        process = subprocess.Popen(
            [executable, *cli_cases.argv(case, values)],
            cwd=folder,
            env={**os.environ, **case.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((case, folder, before, process))
    for case, folder, before, process in runs:
        out, err = process.communicate(timeout=300)
        _check_cli(case, process.returncode, out, err)
        assert _tree(folder) == before, f"{case.id}: files were created or changed"
