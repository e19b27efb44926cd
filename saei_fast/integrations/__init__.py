"""Thin adapters that plug SaEI sampling into existing RL trainers (``trl``, ...).

Each submodule imports its trainer framework; importing ``saei_fast`` imports none of them.
"""
