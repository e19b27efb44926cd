"""Device side of the band op (``saei_fast.ops.band``): the entropy-rank band select, a radix
select over unique (value, position) keys that never synchronises with the host.

- ``radix``: keys and the radix-select steps (``@triton.jit`` helpers);
- ``kernels``: the kernels of both schedules (one program per segment, or per chunk);
- ``config``: the launch configuration (schedule, tile, warps) per target;
- ``launch``: the launcher ``band_select``;
- ``plans``: ``benchmark_plans(target)``, the launches ``saei-fast kernels`` compiles.
"""
