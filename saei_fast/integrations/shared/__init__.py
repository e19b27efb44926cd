"""What the TRL and verl integrations share, owned by neither trainer.

- :mod:`.rows`: per-row views of a processor's batched multimodal fields, and the model
  batches the attack runs on (TRL's generation hook and verl's agent loop);
- :mod:`.fused_head`: saei-fast's fused LM head standing in for TRL's chunked head in the
  loss, old and reference passes;
- :mod:`.fused_loss`: the GRPO token loss whose gradient the fused head takes while each
  chunk's logits are in memory;
- :mod:`.checkpointing`: activation checkpointing switched on for the attack inside a
  trainer's generation context.

Importing this package (or any of its modules) imports neither ``trl`` nor ``verl``: the
benchmarks import its modules from the ``[bench]`` extra, which has neither.
"""
