"""``saei-fast demo --num-processes N``: the flag's checks, the per-process batch, the
held-out evaluation on rank 0 only, and the launcher. The launcher's multi-process training
itself runs in tests/test_trl_multiprocess.py (2 CPU processes through
:func:`saei_fast.tools.demo.processes.launch`)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from saei_fast.cli import main
from saei_fast.tools.demo import processes
from saei_fast.tools.demo.distributed import check_num_processes
from saei_fast.tools.demo.options import DemoError, DemoOptions
from saei_fast.tools.demo.processes import launch, launch_command


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be an integer >= 1, got 0"),
        (True, "must be an integer >= 1, got True"),
        (3, "--num-processes 3 must divide the 4 prompts per GRPO step"),
    ],
)
def test_num_processes_must_split_the_prompts_into_whole_groups(value, message):
    with pytest.raises(DemoError, match=message):
        check_num_processes(value, 4)
    assert check_num_processes(2, 4) == 2 and check_num_processes(4, 4) == 4


def test_demo_refuses_a_process_count_that_splits_groups_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["demo", "--num-processes", "3", "--output-dir", str(out)])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("saei-fast demo: error: --num-processes 3 must divide the 4")
    assert "\n" not in error and not out.exists()


def test_each_process_takes_its_share_of_a_steps_prompts(monkeypatch, tmp_path):
    from saei_fast.tools.demo.arms import arm_config
    from saei_fast.tools.demo.model import demo_model
    from saei_fast.tools.demo.setup import build_setup

    setup = build_setup(DemoOptions(output_dir=str(tmp_path), num_processes=2))
    model = demo_model(setup.processor, seed=0)
    recipe = setup.recipe
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes.world_size() == 1
    one = arm_config(setup, 0, "saei", tmp_path / "a", model).per_device_train_batch_size
    assert one == recipe.prompts_per_step * recipe.num_generations
    # WORLD_SIZE itself would make the config set up a process group; the count it yields:
    monkeypatch.setattr(processes, "world_size", lambda: 2)
    two = arm_config(setup, 0, "saei", tmp_path / "b", model).per_device_train_batch_size
    assert two == recipe.prompts_per_step // 2 * recipe.num_generations
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert processes.world_size() == 2


def test_launch_runs_a_module_in_n_ranked_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(\n"
        "    os.environ['WORLD_SIZE'] + ' ' + os.environ['CUDA_VISIBLE_DEVICES'] + '.')\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    out.mkdir()
    launch("probe", [str(out)], 2, timeout=120, env=env)
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    assert (out / "1").read_text() == "2 ."  # the children see no GPU
    command = launch_command("probe", ["x"], 3)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=3" in command and command[-2:] == ["probe", "x"]
    with pytest.raises(ValueError, match="num_processes must be an integer >= 1"):
        launch("probe", [], 0)


def test_only_rank_zero_runs_the_held_out_evaluation_and_every_rank_waits(monkeypatch):
    from saei_fast.tools.demo import arms

    evaluations, waits = [], []

    def fake_evaluate(model, processor, examples, **settings):
        evaluations.append(settings)
        return {"accuracy": 0.25}

    monkeypatch.setattr(arms, "evaluate", fake_evaluate)
    monkeypatch.setattr(processes, "barrier", lambda: waits.append(processes.rank()))
    recipe = SimpleNamespace(samples=2, temperature=0.9, max_completion_length=3)
    setup = SimpleNamespace(recipe=recipe, processor=None, heldout=[])
    monkeypatch.setenv("RANK", "1")
    assert arms.held_out_metrics(setup, 2, None, 5) is None
    assert evaluations == [] and waits == [1]
    monkeypatch.setenv("RANK", "0")
    assert arms.held_out_metrics(setup, 2, None, 5) == {"step": 5, "accuracy": 0.25}
    assert [e["seed"] for e in evaluations] == [1_000_003 * 2 + 5] and waits == [1, 0]
    # One process (no RANK): it evaluates, as before --num-processes existed.
    monkeypatch.delenv("RANK")
    assert arms.held_out_metrics(setup, 2, None, 6) == {"step": 6, "accuracy": 0.25}
    assert len(evaluations) == 2 and waits == [1, 0, 0]


def test_barrier_is_a_no_op_without_a_process_group():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    assert processes.barrier() is None
