"""Local CPU processes under ``torch.distributed.run``: :func:`launch` starts a Python module
in ``N`` processes on this machine (``gloo``; TRL's trainer, through accelerate, reads the
``RANK`` / ``WORLD_SIZE`` variables it sets and wraps the policy in DDP), and the helpers a
process uses inside such a run (:func:`rank`, :func:`world_size`, :func:`barrier`,
:func:`close_process_group`). Nothing demo-specific: the tests launch their own workers
with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


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
