"""The compile-time kernel report (``saei-fast kernels``)."""
