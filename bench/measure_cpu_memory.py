"""Peak extra memory and time of entropy from hidden states on the CPU: ours vs naive PyTorch
(``F.linear`` to full logits, then eager entropy) vs chunked PyTorch (fused-linear-for-PPO
style: token chunks under activation checkpointing) vs TRL 1.16's fused head
(``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, torch ops off CUDA; provider
``trl``, when TRL is installed).

The lm_head is frozen (as in the entropy attack): "forward+backward" is the gradient w.r.t.
``hidden`` only. Memory: each (provider, mode) runs in a fresh interpreter, so allocator reuse
cannot hide memory; after one warm-up call (one-time allocations such as thread pools are not
the op's), peak extra memory is the RSS high-water mark of a call above the RSS before it.
Time: one interpreter runs the providers in turn, round after round (the first round is a
warm-up), so load from other work on a shared machine hits them alike; the median is kept.

    python bench/measure_cpu_memory.py --n 2048 --d 512 --v 151936
"""

from __future__ import annotations

import argparse
import time

from saei_fast.memory import run_isolated

_SETUP = """
import json, sys, time, torch
from saei_fast.memory import peak_memory_of
from saei_fast.ops import linear_entropy
from saei_fast.reference import chunked_linear_entropy, naive_linear_entropy

n, d, v, mode, repeats = sys.argv[1:6]
n, d, v, repeats = int(n), int(d), int(v), int(repeats)
providers = sys.argv[6:]
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(n, d, generator=gen)
weight = torch.randn(v, d, generator=gen).mul_(d ** -0.5)  # frozen lm_head
labels = torch.randint(0, v, (n,), generator=gen)

def trl_entropy(h):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    # TRL's GRPO loss passes a 32768-column vocabulary chunk; log p is always computed.
    return ChunkedLogProbFunction.apply(h, weight, None, labels, 1.0, 32768, None, 1.0,
                                        ("entropy",))[1]

FNS = {
    "ours": lambda h: linear_entropy(h, weight, impl="torch"),
    "naive": lambda h: naive_linear_entropy(h, weight),
    "chunked": lambda h: chunked_linear_entropy(h, weight),
    "trl": trl_entropy,
}

def runner(provider):
    fn = FNS[provider]
    def run():
        if mode == "forward":
            with torch.no_grad():
                fn(hidden)
        else:
            leaf = hidden.detach().requires_grad_(True)
            fn(leaf).sum().backward()
    return run
"""

_MEMORY = """
(provider,) = providers
run = runner(provider)
run()
print(json.dumps({"peak": peak_memory_of(run)}))
"""

_TIME = """
runs = {p: runner(p) for p in providers}
times = {p: [] for p in providers}
for round in range(repeats + 1):
    for p, run in runs.items():
        start = time.perf_counter()
        run()
        if round:
            times[p].append(time.perf_counter() - start)
print(json.dumps({p: sorted(t)[len(t) // 2] for p, t in times.items()}))
"""


def _worker(code: str, n, d, v, mode, repeats, providers) -> dict:
    return run_isolated(_SETUP + code, n, d, v, mode, repeats, *providers)


MODES = ("forward", "forward+backward")
PROVIDERS = ("naive", "ours", "chunked", "trl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, default=["naive", "ours", "chunked"]
    )
    args = parser.parse_args()
    # The ratios are against naive when it runs, else against the first provider named.
    base = "naive" if "naive" in args.providers else args.providers[0]

    print(
        f"# linear entropy, CPU, N={args.n}, D={args.d}, V={args.v}, float32, frozen weight, "
        f"{time.strftime('%F')}"
    )
    print(
        f"| mode | provider | median time (s) | peak extra memory (MiB) | time / {base} "
        f"| memory / {base} |"
    )
    print("|---|---|---|---|---|---|")
    shape = (args.n, args.d, args.v)
    for mode in args.modes:
        peaks = {p: _worker(_MEMORY, *shape, mode, 0, [p])["peak"] for p in args.providers}
        medians = _worker(_TIME, *shape, mode, args.repeats, args.providers)
        for p in args.providers:
            print(
                f"| {mode} | {p} | {medians[p]:.2f} | {peaks[p] / 2**20:.0f} | "
                f"{medians[p] / medians[base]:.2f} | {peaks[p] / peaks[base]:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
