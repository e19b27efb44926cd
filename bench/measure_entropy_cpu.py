"""Peak extra memory and time of entropy-from-logits on the CPU: ours vs naive PyTorch.

Each (provider, mode) runs in a fresh interpreter, so allocator reuse cannot hide memory;
peak extra memory is the RSS high-water mark above the RSS once the logits exist.

    python bench/measure_entropy_cpu.py --n 4096 --v 151936
"""

from __future__ import annotations

import argparse
import time

from saei_fast.memory import run_isolated

_WORKER = """
import json, sys, time, torch
from saei_fast.memory import peak_memory_of
from saei_fast.ops import logprobs_and_entropy
from saei_fast.reference import naive_logprobs_and_entropy

n, v, provider, mode, repeats = sys.argv[1:6]
n, v, repeats = int(n), int(v), int(repeats)
gen = torch.Generator().manual_seed(0)
logits = torch.randn(n, v, generator=gen).mul_(3)
labels = torch.randint(0, v, (n,), generator=gen)
if provider == "ours":
    fn = lambda x: logprobs_and_entropy(x, labels, impl="torch")
else:
    fn = lambda x: naive_logprobs_and_entropy(x, labels)

def run():
    if mode == "forward":
        with torch.no_grad():
            fn(logits)
    else:
        leaf = logits.detach().requires_grad_(True)
        logp, ent = fn(leaf)
        (ent.sum() + logp.sum()).backward()

peak = peak_memory_of(run)  # the first call: nothing reused yet
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"peak": peak, "median_s": times[len(times) // 2],
                  "logits_bytes": logits.numel() * 4}))
"""


def measure(n: int, v: int, provider: str, mode: str, repeats: int) -> dict:
    return run_isolated(_WORKER, n, v, provider, mode, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"# entropy from logits, CPU, N={args.n}, V={args.v}, float32, {time.strftime('%F')}")
    print(
        "| mode | provider | median time (s) | peak extra memory (MiB) "
        "| time / naive | memory / naive |"
    )
    print("|---|---|---|---|---|---|")
    for mode in ("forward", "forward+backward"):
        rows = {p: measure(args.n, args.v, p, mode, args.repeats) for p in ("naive", "ours")}
        for provider, row in rows.items():
            naive = rows["naive"]
            print(
                f"| {mode} | {provider} | {row['median_s']:.3f} | {row['peak'] / 2**20:.0f} | "
                f"{row['median_s'] / naive['median_s']:.2f} | {row['peak'] / naive['peak']:.3f} |"
            )


if __name__ == "__main__":
    main()
