"""``saei-fast demo``: vanilla GRPO, SaEI and a random-perturbation control on a tiny
Qwen2.5-VL and a synthetic visual task, from a supervised warm start, over several seeds,
on the CPU in minutes (or on a local VLM and JSONL data set).

``saei_fast.tools.demo.run.run_demo(DemoOptions(...))`` is the command as a function; it
needs the ``demo`` extra (TRL, matplotlib), which importing this package does not. One job
per module: ``options`` (flags), ``setup`` (checks, recipe, data), ``task`` (synthetic
task, reward, JSONL), ``model`` (tiny model and processor), ``warmup`` (cached supervised
warm start), ``arms`` (one GRPO run), ``evaluate`` (sampled accuracy, pass@k, entropy),
``stats`` (paired differences, t-intervals), ``summary``, ``plots``, ``processes`` (local
CPU processes under ``torch.distributed.run``), ``distributed`` (the runs over
``--num-processes`` processes), ``run`` (orchestration) and ``command`` (the subcommand).
"""

from saei_fast.tools.demo.options import DemoError, DemoOptions

__all__ = ["DemoError", "DemoOptions"]
