"""``saei-fast demo``: vanilla GRPO vs SaEI on a tiny Qwen2.5-VL and a synthetic visual task,
trained on the CPU in minutes (or on a local VLM and JSONL data set).

``saei_fast.demo.run.run_demo(DemoOptions(...))`` is the command as a function; it needs the
``demo`` extra (TRL, matplotlib), which importing this package does not.
"""

from saei_fast.demo.options import DemoOptions

__all__ = ["DemoOptions"]
