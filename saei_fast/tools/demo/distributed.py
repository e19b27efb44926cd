"""``saei-fast demo --num-processes N``: the demo's runs spread over local CPU processes.

:func:`run_distributed`: the parent takes each seed's warm start (cached, one process), then
one launch (:func:`saei_fast.tools.demo.processes.launch`) of ``N`` processes trains every
(seed, arm) run in turn, each run with a step's prompts split into whole GRPO groups per
process (``prompts_per_step / N`` each, see :func:`saei_fast.tools.demo.arms.arm_config`: a
step sees the same prompts as with one process); rank 0 alone runs the held-out evaluations
(the others wait at a barrier) and writes the runs' records, which the parent summarises as
usual.

Run as ``python -m saei_fast.tools.demo.distributed SPEC.json``: the worker side (``SPEC``
names the options, the warm starts, the scratch folder and the records file).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from saei_fast.tools.demo.arms import train_arm
from saei_fast.tools.demo.options import DemoError, DemoOptions
from saei_fast.tools.demo.processes import close_process_group, launch, world_size
from saei_fast.tools.demo.setup import build_setup
from saei_fast.tools.demo.warmup import warm_start


def check_num_processes(num_processes: object, prompts_per_step: int) -> int:
    """``num_processes`` as a count that splits the demo's prompts per step evenly.

    Raises:
        DemoError: not an integer >= 1, or it does not divide ``prompts_per_step``.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise DemoError(f"--num-processes must be an integer >= 1, got {num_processes!r}")
    if prompts_per_step % num_processes:
        raise DemoError(
            f"--num-processes {num_processes} must divide the {prompts_per_step} prompts per "
            "GRPO step: every process samples whole groups"
        )
    return num_processes


def run_distributed(setup, scratch: Path, num_processes: int, *, log=print) -> list[dict]:
    """Every (seed, arm) run of ``setup`` with ``num_processes`` CPU processes per run; the
    records :func:`saei_fast.tools.demo.run.run_all` would return."""
    check_num_processes(num_processes, setup.recipe.prompts_per_step)
    warm = {seed: warm_start(setup, seed, log=log) for seed in setup.recipe.seeds}
    spec = {
        "options": asdict(setup.options),
        "warm": {str(seed): None if path is None else str(path) for seed, path in warm.items()},
        "scratch": str(scratch),
        "records": str(scratch / "records.json"),
    }
    spec_path = scratch / "distributed.json"
    spec_path.write_text(json.dumps(spec))
    launch("saei_fast.tools.demo.distributed", [str(spec_path)], num_processes)
    return json.loads(Path(spec["records"]).read_text())


def _worker(spec_path: str) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # as run_demo: readable progress lines
    # TRL warns about settings the demo chose on purpose, transformers about
    # TrainingArguments names that TRL still sets (as run_demo filters them).
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    spec = json.loads(Path(spec_path).read_text())
    options = spec["options"]
    options = DemoOptions(
        **{
            **options,
            "seeds": tuple(options["seeds"] or ()) or None,
            "arms": tuple(options["arms"]),
        }
    )
    setup = build_setup(options)
    world = world_size()
    rank = int(os.environ["RANK"])
    log = print if rank == 0 else (lambda _line: None)
    scratch = Path(spec["scratch"])
    records = []
    for seed in setup.recipe.seeds:
        warm = spec["warm"][str(seed)]
        for arm in setup.options.arms:
            record = train_arm(setup, seed, arm, warm and Path(warm), scratch, log=log)
            records.append({**record, "processes": world})
    if rank == 0:
        Path(spec["records"]).write_text(json.dumps(records))
    close_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
