"""The demo's synthetic visual task, its exact-match reward, and the JSONL loader for real data.

Default task, "which colour covers most of the image?": a 56 x 56 image is cut into a 4 x 4
grid of cells (one cell per 14-pixel vision patch); 10 to 13 of the 16 cells take the
majority colour, the rest a second colour, each cell with its own small brightness jitter.
The answer is the majority colour's name, one word out of four, so a policy that ignores the
image is right a quarter of the time, and one that names a colour it sees but cannot tell
which covers more is right half of the time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 205, 40),
}
QUESTION = "what colour covers most of the image?"
IMAGE_SIDE = 56
GRID = 4
MAJORITY_CELLS = (10, 13)  # inclusive range, out of GRID * GRID
JITTER = 25  # per-cell brightness jitter, 8-bit levels


@dataclass(frozen=True)
class Example:
    """One (image, question, answer) triple."""

    image: Image.Image
    question: str
    answer: str


def chance_level(answers: Sequence[str] = tuple(COLOURS)) -> float:
    """Accuracy of a uniform guess among the possible answers."""
    return 1.0 / len(set(answers))


def task_words() -> list[str]:
    """Every word the synthetic task's prompts and answers use (the tokenizer's vocabulary)."""
    words = QUESTION.replace("?", " ? ").split()
    return [*dict.fromkeys(words), *COLOURS]


def colour_examples(count: int, *, seed: int) -> list[Example]:
    """``count`` examples of the synthetic colour task from ``seed`` (same seed, same data)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    cell = IMAGE_SIDE // GRID
    examples = []
    for _ in range(count):
        major, minor = rng.choice(len(names), size=2, replace=False)
        cells = rng.integers(MAJORITY_CELLS[0], MAJORITY_CELLS[1] + 1)
        owner = np.full(GRID * GRID, minor)
        owner[rng.choice(GRID * GRID, size=cells, replace=False)] = major
        pixels = np.empty((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        for index, colour in enumerate(owner):
            top, left = divmod(index, GRID)
            shade = np.array(COLOURS[names[colour]]) + rng.integers(-JITTER, JITTER + 1)
            pixels[top * cell : (top + 1) * cell, left * cell : (left + 1) * cell] = np.clip(
                shade, 0, 255
            )
        examples.append(Example(Image.fromarray(pixels), QUESTION, names[major]))
    return examples


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of ``{"image": ..., "question": ..., "answer": ...}`` lines;
    image paths are relative to the file's folder.

    Raises:
        ValueError: a line that is not such an object (names the line).
    """
    path = Path(path)
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image_path = path.parent / row["image"]
            question, answer = str(row["question"]), str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}:{number} must be a JSON object with 'image', 'question' and 'answer', "
                f"got {line[:80]!r} ({error})"
            ) from None
        with Image.open(image_path) as image:
            examples.append(Example(image.convert("RGB"), question, answer))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def completion_text(completion: object) -> str:
    """The text of a TRL completion (a string, or a conversation whose last turn is the answer)."""
    if isinstance(completion, list):
        completion = completion[-1]["content"]
    return str(completion)


def exact_answer_reward(completions: list, answer: list[str], **_) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is exactly the answer."""
    return [
        float(completion_text(completion).strip() == expected)
        for completion, expected in zip(completions, answer, strict=True)
    ]


def to_dataset(examples: Sequence[Example]):
    """A ``datasets.Dataset`` in TRL's conversational image format (``prompt``, ``image``,
    ``answer`` columns)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": example.question}] for example in examples],
            "image": [example.image for example in examples],
            "answer": [example.answer for example in examples],
        }
    )
