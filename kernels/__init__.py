"""Triton kernels and their launchers only: no autograd, no models.

Importing a module here imports Triton; the ``saei_fast.ops`` layer imports them lazily so
that the package works (on its PyTorch path) where Triton is not installed.
"""
