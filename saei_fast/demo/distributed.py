"""Several CPU processes for ``saei-fast demo --num-processes N``, and the launcher under it.

:func:`launch` starts a Python module in ``N`` processes with ``torch.distributed.run`` on
this machine (``gloo``; TRL's trainer, through accelerate, reads the ``RANK`` /
``WORLD_SIZE`` variables it sets and wraps the policy in DDP). :func:`run_distributed` is
the demo's use of it: the parent takes each seed's warm start (cached, one process), then
one launch of ``N`` processes trains every (seed, arm) run in turn, each run with a step's
prompts split into whole GRPO groups per process (``prompts_per_step / N`` each, see
:func:`saei_fast.demo.arms.arm_config`: a step sees the same prompts as with one process);
rank 0 alone runs the held-out evaluations (the others wait at a barrier) and writes the
runs' records, which the parent summarises as usual.

Run as ``python -m saei_fast.demo.distributed SPEC.json``: the worker side (``SPEC`` names
the options, the warm starts, the scratch folder and the records file).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from saei_fast.demo.options import DemoError, DemoOptions


def world_size() -> int:
    """Processes of this run: ``WORLD_SIZE`` as ``torch.distributed.run`` sets it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank: ``RANK`` as ``torch.distributed.run`` sets it, else 0."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    """Wait until every process of the run gets here; nothing with one process (or before
    the trainer has set up the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close_process_group() -> None:
    """Destroy the default process group without gloo's hang at exit.

    A DDP wrapper's reducer holds the process group. If the reducer is the last holder, the
    group is destroyed when the reducer is freed, with the GIL held: gloo's destructor joins
    its worker thread, and a worker thread still releasing finished work (whose tensors need
    the GIL to be freed) never returns, so the process hangs after its work is done. Hence:
    free unreachable DDP wrappers while the group is still registered, let every rank's
    queued work finish (a barrier, waited on without the GIL), then destroy the group. Callers
    drop their own references to trainers and models first.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    barrier()
    dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(module: str, args: list[str], num_processes: int) -> list[str]:
    """The ``torch.distributed.run`` command line that runs ``python -m module args`` in
    ``num_processes`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={num_processes}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--module",
        module,
        *args,
    ]


def launch(
    module: str, args: list[str], num_processes: int, *, timeout: float | None = None, env=None
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in ``num_processes`` local CPU processes and wait.

    The children run on the CPU (``CUDA_VISIBLE_DEVICES`` empty, ``ACCELERATE_USE_CPU``), one
    intra-op thread each (the processes already share the cores). Output goes to this
    process's stdout / stderr.

    Raises:
        ValueError: ``num_processes`` is not an integer >= 1.
        subprocess.CalledProcessError: a process failed (its traceback is in stderr).
        subprocess.TimeoutExpired: ``timeout`` seconds passed.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
    child_env = dict(os.environ if env is None else env)
    # OMP_NUM_THREADS set here also keeps torch.distributed.run from warning that it sets it.
    child_env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    command = launch_command(module, args, num_processes)
    with subprocess.Popen(command, env=child_env) as process:
        try:
            code = process.wait(timeout=timeout)
        except BaseException:
            # torch.distributed.run ends its workers (own process groups) on SIGTERM.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if code:
        raise subprocess.CalledProcessError(code, command)
    return subprocess.CompletedProcess(command, code)


# -------------------------------------------------------------------------------------------
# The demo
# -------------------------------------------------------------------------------------------


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
    records :func:`saei_fast.demo.run.run_all` would return."""
    from saei_fast.demo.warmup import warm_start

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
    launch("saei_fast.demo.distributed", [str(spec_path)], num_processes)
    return json.loads(Path(spec["records"]).read_text())


def _worker(spec_path: str) -> None:
    import torch
    import transformers

    from saei_fast.demo.arms import train_arm
    from saei_fast.demo.setup import build_setup

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
