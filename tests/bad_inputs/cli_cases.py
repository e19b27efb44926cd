"""Catalogue: the ``saei-fast`` command (``info``, ``demo``, ``bench``, ``kernels``).

Every entry is a user error, which must be reported before any work as one line
``saei-fast <command>: error: ...`` on stderr (naming the flag or the file at fault), with
exit status 2, no traceback, nothing on stdout and nothing created.

Arguments may hold placeholders for files prepared in the test's folder: ``{file}`` (a
regular file), ``{missing}`` (a path that does not exist), ``{out}`` (an output folder
that must not be created) and ``{jsonl:NAME}`` (the data sets of :data:`DATASETS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CliCase:
    """``argv`` for ``saei-fast``; ``command`` is the subcommand the error line names (None:
    the top-level command); ``names`` a regular expression the message must match."""

    id: str
    argv: tuple[str, ...]
    command: str | None
    names: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return (
            "saei-fast: error: " if self.command is None else f"saei-fast {self.command}: error: "
        )


# JSONL data sets for ``demo --dataset``: each holds one defect (and the line it is on).
DATASETS = {
    "not-json": '{"image": "a.png", "question": "q", "answer": "red"}\n{not json}\n',
    "no-answer": '{"image": "a.png", "question": "q"}\n',
    "image-missing": '{"image": "nowhere.png", "question": "q", "answer": "red"}\n',
    "not-an-image": '{"image": "notes.png", "question": "q", "answer": "red"}\n',
    "one-example": '{"image": "a.png", "question": "q", "answer": "red"}\n',
    "empty": "\n",
}


def prepare(folder: Path) -> dict[str, str]:
    """Create the files the placeholders point to; returns the placeholder values."""
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "a-file").write_text("a regular file")
    values = {
        "file": str(folder / "a-file"),
        "missing": str(folder / "missing"),
        "out": str(folder / "out"),
    }
    for name, text in DATASETS.items():
        path = folder / f"{name}.jsonl"
        path.write_text(text)
        values[f"jsonl:{name}"] = str(path)
    return values


def argv(case: CliCase, values: dict[str, str]) -> list[str]:
    out = []
    for argument in case.argv:
        for key, value in values.items():
            argument = argument.replace("{" + key + "}", value)
        out.append(argument)
    return out


def _cases(command: str | None, entries: dict) -> list[CliCase]:
    cases = []
    for name, entry in entries.items():
        arguments, names, *env = entry
        prefix = () if command is None else (command,)
        cases.append(
            CliCase(
                f"{command or 'saei-fast'}/{name}",
                (*prefix, *arguments),
                command,
                names,
                env[0] if env else {},
            )
        )
    return cases


TOP = {
    "no-command": ((), "command"),
    "unknown-command": (("train",), "train"),
}

INFO = {
    "unknown-flag": (("--json",), "--json"),
    "extra-argument": (("now",), "now"),
    "bad-saei-impl": ((), "SAEI_IMPL", {"SAEI_IMPL": "fast"}),
}

DEMO_OUT = ("--output-dir", "{out}")
DEMO = {
    "unknown-flag": ((*DEMO_OUT, "--epochs", "3"), "--epochs"),
    "steps-not-int": ((*DEMO_OUT, "--steps", "x"), "--steps"),
    "steps-0": ((*DEMO_OUT, "--steps", "0"), "--steps"),
    "steps-negative": ((*DEMO_OUT, "--steps", "-1"), "--steps"),
    "alpha-0": ((*DEMO_OUT, "--alpha", "0"), "--alpha"),
    "alpha-nan": ((*DEMO_OUT, "--alpha", "nan"), "--alpha"),
    "alpha-above-1": ((*DEMO_OUT, "--alpha", "2"), "--alpha"),
    "alpha-not-a-number": ((*DEMO_OUT, "--alpha", "2/255"), "--alpha"),
    "arms-unknown": ((*DEMO_OUT, "--arms", "vanilla,bogus"), "--arms"),
    "arms-empty": ((*DEMO_OUT, "--arms", ""), "--arms"),
    "arms-repeated": ((*DEMO_OUT, "--arms", "vanilla,vanilla"), "--arms"),
    "seeds-not-int": ((*DEMO_OUT, "--seeds", "a,b"), "--seeds"),
    "seeds-repeated": ((*DEMO_OUT, "--seeds", "1,1"), "--seeds"),
    "seeds-negative": ((*DEMO_OUT, "--seeds", "-3"), "--seeds"),
    "eval-every-0": ((*DEMO_OUT, "--eval-every", "0"), "--eval-every"),
    "eval-size-0": ((*DEMO_OUT, "--eval-size", "0"), "--eval-size"),
    "samples-0": ((*DEMO_OUT, "--samples", "0"), "--samples"),
    "warmup-steps-negative": ((*DEMO_OUT, "--warmup-steps", "-1"), "--warmup-steps"),
    "workers-0": ((*DEMO_OUT, "--workers", "0"), "--workers"),
    "model-missing": ((*DEMO_OUT, "--model", "{missing}"), "--model"),
    "model-is-a-file": ((*DEMO_OUT, "--model", "{file}"), "--model"),
    "dataset-missing": ((*DEMO_OUT, "--dataset", "{missing}.jsonl"), "--dataset"),
    "dataset-not-json": ((*DEMO_OUT, "--dataset", "{jsonl:not-json}"), r"not-json\.jsonl:2"),
    "dataset-no-answer": ((*DEMO_OUT, "--dataset", "{jsonl:no-answer}"), r"no-answer\.jsonl:1"),
    "dataset-image-missing": (
        (*DEMO_OUT, "--dataset", "{jsonl:image-missing}"),
        r"image-missing\.jsonl:1.*nowhere\.png",
    ),
    "dataset-not-an-image": (
        (*DEMO_OUT, "--dataset", "{jsonl:not-an-image}"),
        r"not-an-image\.jsonl:1.*notes\.png",
    ),
    "dataset-one-example": ((*DEMO_OUT, "--dataset", "{jsonl:one-example}"), "--dataset"),
    "dataset-empty": ((*DEMO_OUT, "--dataset", "{jsonl:empty}"), "--dataset"),
    "output-dir-is-a-file": (("--output-dir", "{file}"), "--output-dir"),
    "output-dir-inside-a-file": (("--output-dir", "{file}/out"), "--output-dir"),
    "cache-dir-is-a-file": ((*DEMO_OUT, "--cache-dir", "{file}"), "--cache-dir"),
}

BENCH_OUT = ("--out", "{out}")
BENCH = {
    "unknown-flag": ((*BENCH_OUT, "--repeat", "3"), "--repeat"),
    "shapes-comma": ((*BENCH_OUT, "--shapes", ","), "--shapes"),
    "shapes-blank": ((*BENCH_OUT, "--shapes", " "), "--shapes"),
    # Malformed, not "no case matches".
    "shapes-nonsense": ((*BENCH_OUT, "--shapes", "nonsense"), r"^(?!.*no case matches).*nonsense"),
    "shapes-unknown-op": ((*BENCH_OUT, "--shapes", "softmax:4x8"), "softmax"),
    "ops-unknown": ((*BENCH_OUT, "--ops", "softmax"), "softmax"),
    "providers-unknown": ((*BENCH_OUT, "--providers", "bogus"), "bogus"),
    "threads-0": ((*BENCH_OUT, "--threads", "0"), "--threads"),
    "threads-not-int": ((*BENCH_OUT, "--threads", "x"), "--threads"),
    "device-unknown": ((*BENCH_OUT, "--device", "tpu"), "--device"),
    "out-is-a-file": (("--out", "{file}", "--quick"), "--out"),
    "out-inside-a-file": (("--out", "{file}/out", "--quick"), "--out"),
}

KERNELS_OUT = ("--out", "{out}")
KERNELS = {
    "arch-unknown": ((*KERNELS_OUT, "--arch", "sm_99"), "--arch"),
    "arch-missing": (KERNELS_OUT, "--arch"),
    "out-missing": (("--arch", "sm_90"), "--out"),
    "ops-unknown": ((*KERNELS_OUT, "--arch", "sm_90", "--ops", "softmax"), "--ops"),
    "ops-empty": ((*KERNELS_OUT, "--arch", "sm_90", "--ops", ","), "--ops"),
    "jobs-0": ((*KERNELS_OUT, "--arch", "sm_90", "--jobs", "0"), "--jobs"),
    "jobs-not-int": ((*KERNELS_OUT, "--arch", "sm_90", "--jobs", "x"), "--jobs"),
    "out-is-a-file": (("--out", "{file}", "--arch", "sm_90"), "--out"),
}

CASES = (
    _cases(None, TOP)
    + _cases("info", INFO)
    + _cases("demo", DEMO)
    + _cases("bench", BENCH)
    + _cases("kernels", KERNELS)
)

# Run through the installed executable as well (each start imports torch: a few seconds, so
# one per command; they run side by side).
EXECUTABLE = (
    "saei-fast/unknown-command",
    "info/bad-saei-impl",
    "demo/steps-0",
    "bench/threads-0",
    "kernels/arch-unknown",
)
