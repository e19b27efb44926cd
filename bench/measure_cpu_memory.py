"""Peak extra memory and time of entropy from hidden states on the CPU: ours vs naive PyTorch
(``F.linear`` to full logits, then eager entropy) vs chunked PyTorch (fused-linear-for-PPO
style: token chunks under activation checkpointing).

The lm_head is frozen (as in the entropy attack): "forward+backward" is the gradient w.r.t.
``hidden`` only. Each (provider, mode) runs in a fresh interpreter, so allocator reuse cannot
hide memory; peak extra memory is the RSS high-water mark of the first call above the RSS
once the inputs exist, and the time is the median of the calls after it.

    python bench/measure_cpu_memory.py --n 2048 --d 512 --v 151936
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_WORKER = """
import json, sys, time, torch
from saei_fast.memory import peak_memory_of
from saei_fast.ops import linear_entropy
from saei_fast.reference import chunked_linear_entropy, naive_linear_entropy

n, d, v, provider, mode, repeats = sys.argv[1:7]
n, d, v, repeats = int(n), int(d), int(v), int(repeats)
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(n, d, generator=gen)
weight = torch.randn(v, d, generator=gen).mul_(d ** -0.5)  # frozen lm_head
fn = {
    "ours": lambda h: linear_entropy(h, weight, impl="torch"),
    "naive": lambda h: naive_linear_entropy(h, weight),
    "chunked": lambda h: chunked_linear_entropy(h, weight),
}[provider]

def run():
    if mode == "forward":
        with torch.no_grad():
            fn(hidden)
    else:
        leaf = hidden.detach().requires_grad_(True)
        fn(leaf).sum().backward()

peak = peak_memory_of(run)  # the first call: nothing reused yet
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"peak": peak, "median_s": times[len(times) // 2]}))
"""

MODES = ("forward", "forward+backward")
PROVIDERS = ("naive", "ours", "chunked")


def measure(n: int, d: int, v: int, provider: str, mode: str, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, str(n), str(d), str(v), provider, mode, str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    args = parser.parse_args()
    if "naive" not in args.providers:
        parser.error("--providers must include naive (the ratios are against it)")

    print(
        f"# linear entropy, CPU, N={args.n}, D={args.d}, V={args.v}, float32, frozen weight, "
        f"{time.strftime('%F')}"
    )
    print(
        "| mode | provider | median time (s) | peak extra memory (MiB) | time / naive "
        "| memory / naive |"
    )
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        rows = {p: measure(args.n, args.d, args.v, p, mode, args.repeats) for p in args.providers}
        naive = rows["naive"]
        for provider, row in rows.items():
            print(
                f"| {mode} | {provider} | {row['median_s']:.2f} | {row['peak'] / 2**20:.0f} | "
                f"{row['median_s'] / naive['median_s']:.2f} | {row['peak'] / naive['peak']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
