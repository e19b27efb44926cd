"""The bad-input catalogue of ``tests/test_catalogue.py``: tables of bad, edge and hostile
inputs to every public entry point, each with the outcome it must have.

``core`` holds the outcome classes and the checks; the other modules hold one table each
(ops from logits, ops from hidden states, band selection and advantages, the backward of
non-finite rows, pixel spaces, configs, the command line).
"""
