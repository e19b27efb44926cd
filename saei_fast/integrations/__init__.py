"""Thin adapters that plug SaEI sampling into existing RL trainers, side by side:

- :mod:`.trl`: SaEI inside TRL's ``GRPOTrainer`` (``SaEIConfig``, ``SaEIGRPOTrainer``);
- :mod:`.verl`: SaEI as a verl plugin (agent loop, trainer, actor worker);
- :mod:`.shared`: what both use and neither owns (per-row batches, the fused head and loss,
  activation checkpointing for the attack).

Each trainer package imports its framework; :mod:`.shared` imports neither, and importing
``saei_fast`` imports none of them. The two trainer packages never import each other.
"""
