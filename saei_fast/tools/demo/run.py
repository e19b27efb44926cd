"""``saei-fast demo`` as a function: vanilla GRPO, SaEI and a random-perturbation control,
from one warm start per seed, over several seeds.

Runs are independent once their seed's warm start exists, so on a CPU they go to a pool of
forked worker processes (one per core, at most 2, one thread each: the tiny model's
matrices are too small to gain from intra-op threads). The output folder receives:

- ``summary.json`` / ``summary.txt``: per-arm values per seed, paired differences with 95%
  intervals, the attack's gain (see :mod:`saei_fast.tools.demo.summary`);
- ``metrics.json``: the settings and every logged step and evaluation of every run;
- ``metrics.csv``: the same steps, one row per (seed, arm, step);
- ``plots/<metric>.png``: one plot per metric, every arm and seed.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from saei_fast.tools.demo.arms import train_arm
from saei_fast.tools.demo.distributed import check_num_processes, run_distributed
from saei_fast.tools.demo.options import DemoOptions
from saei_fast.tools.demo.plots import plot_all
from saei_fast.tools.demo.setup import Setup, build_setup
from saei_fast.tools.demo.summary import build_summary, summary_text
from saei_fast.tools.demo.warmup import warm_start


def run_demo(options: DemoOptions) -> dict:
    """Check ``options`` (raising :class:`~saei_fast.tools.demo.options.DemoError` before any
    work), train every arm and seed, write the output folder, print and return the summary."""
    setup = build_setup(options)
    check_num_processes(options.num_processes, setup.recipe.prompts_per_step)
    import transformers

    transformers.logging.set_verbosity_error()  # keep the progress lines readable
    started = time.perf_counter()
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe = setup.recipe
    if options.model is None:
        parameters = sum(p.numel() for p in setup.make_model(recipe.seeds[0]).parameters())
        model = f"tiny Qwen2.5-VL ({parameters / 1e3:.0f}k parameters)"
    else:
        model = options.model
    print(
        f"saei-fast demo: {setup.description}; {model}; arms "
        f"{', '.join(options.arms)}; seeds {list(recipe.seeds)}; {recipe.steps} GRPO steps "
        f"each; {setup.workers} worker(s)",
        flush=True,
    )
    threads = torch.get_num_threads()
    if options.model is None and not torch.cuda.is_available():
        # Set before any worker is forked: spinning OpenMP threads slow every op of a tiny
        # model down several times over on a busy machine.
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            # TRL warns once per run about settings the demo chose on purpose, and
            # transformers about TrainingArguments names that TRL still sets.
            warnings.filterwarnings("ignore", category=UserWarning, module="trl")
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            records = run_all(setup, Path(scratch))
    finally:
        torch.set_num_threads(threads)
    summary = build_summary(records, setup, seconds=time.perf_counter() - started)
    text = summary_text(summary)
    write_outputs(output_dir, setup, records, summary, text)
    print(text, flush=True)
    return summary


def run_all(setup: Setup, scratch: Path) -> list[dict]:
    """Every (seed, arm) run, each seed's arms after its warm start; ordered by seed, then
    arm as in the options."""
    recipe, arms = setup.recipe, setup.options.arms
    if setup.options.num_processes > 1:
        return run_distributed(setup, scratch, setup.options.num_processes, log=_print)
    if setup.workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        records = []
        for seed in recipe.seeds:
            warm = warm_start(setup, seed, log=_print)
            records += [train_arm(setup, seed, arm, warm, scratch, log=_print) for arm in arms]
        return records

    global _SETUP
    _SETUP = setup  # forked workers inherit it: the data and processor are never pickled
    pool = ProcessPoolExecutor(setup.workers, mp_context=multiprocessing.get_context("fork"))
    try:
        warm_jobs = {pool.submit(_warm_job, seed): seed for seed in recipe.seeds}
        arm_jobs = {}
        for job in as_completed(warm_jobs):
            seed, warm = warm_jobs[job], job.result()
            for arm in arms:
                arm_jobs[seed, arm] = pool.submit(_arm_job, seed, arm, warm, scratch)
        records = [arm_jobs[seed, arm].result() for seed in recipe.seeds for arm in arms]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        _SETUP = None
    pool.shutdown()
    return records


_SETUP: Setup | None = None


def _warm_job(seed: int) -> Path | None:
    torch.set_num_threads(1)
    return warm_start(_SETUP, seed, log=_print)


def _arm_job(seed: int, arm: str, warm: Path | None, scratch: Path) -> dict:
    torch.set_num_threads(1)
    return train_arm(_SETUP, seed, arm, warm, scratch, log=_print)


def _print(line: str) -> None:
    print(line, flush=True)  # whole lines, so that workers' lines do not interleave


def write_outputs(
    output_dir: Path, setup: Setup, records: list[dict], summary: dict, text: str
) -> None:
    """summary.json, summary.txt, metrics.json, metrics.csv and plots/ in ``output_dir``."""
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output_dir / "summary.txt").write_text(text + "\n")
    record = {
        "options": asdict(setup.options),
        "recipe": asdict(setup.recipe),
        "runs": records,
        "summary": summary,
    }
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    step_keys = sorted({key for r in records for step in r["steps"] for key in step} - {"step"})
    eval_keys = sorted({key for r in records for e in r["evals"] for key in e} - {"step"})
    with (output_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "arm", "step", *step_keys, *(f"heldout_{k}" for k in eval_keys)])
        for r in records:
            evals = {e["step"]: e for e in r["evals"]}
            steps = {s["step"]: s for s in r["steps"]}
            for step in sorted(steps.keys() | evals.keys()):
                logged, evaluated = steps.get(step, {}), evals.get(step, {})
                writer.writerow(
                    [
                        r["seed"],
                        r["arm"],
                        step,
                        *(logged.get(key, "") for key in step_keys),
                        *(evaluated.get(key, "") for key in eval_keys),
                    ]
                )
    plot_all(records, output_dir / "plots", samples=setup.recipe.samples)
