"""Time and peak extra memory of entropy + log-probs from logits on the CPU, per provider.

Providers: ``ours`` (the CPU path as shipped: compiled by Inductor), ``ours-eager``
(``SAEI_CPU_COMPILE=0``: the chunked eager fallback), ``compiled`` (``torch.compile`` of the
naive formula, the issue's yardstick) and ``naive`` (eager full softmax; needs several
``[N, V]`` buffers, so it is off by default at large shapes).

Time: one interpreter runs the providers in turn, round after round (one warm-up round
first, which also compiles), so load from other work on a shared machine hits them alike;
the median and the min-max of the timed rounds are printed. Memory: each (provider, mode) in
a fresh interpreter, RSS high-water mark of one call (after a warm-up call) above the RSS
before it. ``--busy K`` starts K busy-looping processes for the duration (an oversubscribed
machine on purpose); ``uptime``'s load average is printed before and after.

    python bench/measure_entropy_cpu.py --n 2048 --v 151936 --threads 2 --busy 2
"""

from __future__ import annotations

import argparse
import os
import time

from saei_fast.memory import run_isolated
from saei_fast.tools.benchmarks.timing import busy_processes

_SETUP = """
import json, os, sys, time, torch
from saei_fast.memory import peak_memory_of
from saei_fast.ops import logprobs_and_entropy
from saei_fast.reference import naive_logprobs_and_entropy

n, v, threads, mode, repeats = (int(a) if a.isdigit() else a for a in sys.argv[1:6])
providers = sys.argv[6:]
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(0)
logits = torch.randn(n, v, generator=gen).mul_(3)
labels = torch.randint(0, v, (n,), generator=gen)
compiled = torch.compile(naive_logprobs_and_entropy)
FNS = {
    "ours": (lambda x: logprobs_and_entropy(x, labels, impl="torch"), "1"),
    "ours-eager": (lambda x: logprobs_and_entropy(x, labels, impl="torch"), "0"),
    "compiled": (lambda x: compiled(x, labels), None),
    "naive": (lambda x: naive_logprobs_and_entropy(x, labels), None),
}

def runner(provider):
    fn, switch = FNS[provider]
    def run():
        if switch is not None:
            os.environ["SAEI_CPU_COMPILE"] = switch
        if mode == "forward":
            with torch.no_grad():
                fn(logits)
        else:
            leaf = logits.detach().requires_grad_(True)
            logp, ent = fn(leaf)
            (ent.sum() + logp.sum()).backward()
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
print(json.dumps(times))
"""

MODES = ("forward", "forward+backward")
PROVIDERS = ("ours", "ours-eager", "compiled", "naive")


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="busy processes to start")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, default=["ours", "ours-eager", "compiled"]
    )
    parser.add_argument("--no-memory", action="store_true", help="time only")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.busy < 0:
        parser.error("--threads and --repeats must be >= 1, --busy >= 0")

    print(
        f"# entropy + log-probs from logits, CPU, N={args.n}, V={args.v}, float32, "
        f"{args.threads} threads, {args.busy} busy processes, {time.strftime('%F %H:%M')}; "
        f"load average {load_average()}"
    )
    print(
        "| mode | provider | median time (s) | min-max (s) | time / compiled "
        "| peak extra memory (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    common = (args.n, args.v, args.threads)
    with busy_processes(args.busy):
        for mode in args.modes:
            times = run_isolated(_SETUP + _TIME, *common, mode, args.repeats, *args.providers)
            peaks = {}
            if not args.no_memory:
                for p in args.providers:
                    peaks[p] = run_isolated(_SETUP + _MEMORY, *common, mode, 0, p)["peak"]
            median = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
            for p in args.providers:
                ratio = median[p] / median["compiled"] if "compiled" in median else float("nan")
                memory = f"{peaks[p] / 2**20:.0f}" if p in peaks else "-"
                print(
                    f"| {mode} | {p} | {median[p]:.3f} | {min(times[p]):.3f}-{max(times[p]):.3f} "
                    f"| {ratio:.2f} | {memory} |",
                    flush=True,
                )
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    main()
