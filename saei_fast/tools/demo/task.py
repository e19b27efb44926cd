"""The demo's synthetic visual task, its reward, and the JSONL loader for real data.

Default task, "which colours are in the image?": a 56 x 56 image is cut into a 4 x 4 grid of
cells (one cell per 14-pixel vision patch); a background colour fills most cells and a
second colour 1 to 3 of them, each cell with its own small brightness jitter; both come from
a palette of eight. The answer names both colours, ``"<a> and <b>"``, and either order is
right: three answer tokens, two valid answers per image, 28 colour pairs. The second colour
covers little of the image, so a policy that has not learnt to look closely names it only
now and then: a correct answer it samples rarely, which exploration can find.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 205, 40),
    "purple": (140, 50, 170),
    "orange": (240, 130, 30),
    "pink": (235, 120, 170),
    "brown": (130, 80, 40),
}
QUESTION = "which colours are in the image?"
IMAGE_SIDE = 56
GRID = 4
MINOR_CELLS = (1, 3)  # inclusive range of cells the second colour covers, out of GRID * GRID
JITTER = 25  # per-cell brightness jitter, 8-bit levels


@dataclass(frozen=True)
class Example:
    """One image and question with every answer that counts as right."""

    image: Image.Image
    question: str
    answers: tuple[str, ...]


def task_words() -> list[str]:
    """Every word the synthetic task's prompts and answers use (the tokenizer's vocabulary)."""
    words = QUESTION.replace("?", " ? ").split()
    return [*dict.fromkeys(words), "and", *COLOURS]


def colour_examples(count: int, *, seed: int) -> list[Example]:
    """``count`` examples of the synthetic colour task from ``seed`` (same seed, same data)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    cell = IMAGE_SIDE // GRID
    examples = []
    for _ in range(count):
        background, minor = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        owner = [background] * (GRID * GRID)
        cells = rng.integers(MINOR_CELLS[0], MINOR_CELLS[1] + 1)
        for index in rng.choice(GRID * GRID, size=cells, replace=False):
            owner[index] = minor
        pixels = np.empty((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        for index, colour in enumerate(owner):
            top, left = divmod(index, GRID)
            shade = np.array(COLOURS[colour]) + rng.integers(-JITTER, JITTER + 1)
            pixels[top * cell : (top + 1) * cell, left * cell : (left + 1) * cell] = np.clip(
                shade, 0, 255
            )
        answers = (f"{background} and {minor}", f"{minor} and {background}")
        examples.append(Example(Image.fromarray(pixels), QUESTION, answers))
    return examples


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of ``{"image": ..., "question": ..., "answer": ...}`` lines;
    ``answer`` is a string or a list of strings (every one counts as right); image paths
    are relative to the file's folder. Every image is opened and decoded here, so that a
    bad one is reported before any training.

    Raises:
        ValueError: a missing or unreadable file, a line that is not such an object, or an
            image that is missing or not an image (each names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--dataset {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--dataset {path} cannot be read: {error}") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            image_name, question, answers = row["image"], row["question"], row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{where} must be a JSON object with 'image', 'question' and 'answer', "
                f"got {line[:80]!r} ({error})"
            ) from None
        answers = (answers,) if isinstance(answers, str) else answers
        if (
            not isinstance(answers, list | tuple)
            or not answers
            or not all(isinstance(answer, str) and answer.strip() for answer in answers)
        ):
            raise ValueError(f"{where}: 'answer' must be a non-empty string or list of them")
        examples.append(
            Example(
                _open_image(path.parent / str(image_name), where), str(question), tuple(answers)
            )
        )
    if not examples:
        raise ValueError(f"--dataset {path} holds no examples")
    return examples


def _open_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{where}: image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{where}: {str(path)!r} is not a readable image ({error})") from None


def completion_text(completion: object) -> str:
    """The text of a TRL completion (a string, or a conversation whose last turn is the answer)."""
    if isinstance(completion, list):
        completion = completion[-1]["content"]
    return str(completion)


def answer_reward(completions: list, answers: list[Sequence[str]], **_) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is one of the answers."""
    return [
        float(completion_text(completion).strip() in expected)
        for completion, expected in zip(completions, answers, strict=True)
    ]


def blind_accuracy(examples: Sequence[Example]) -> float:
    """Accuracy of the best image-blind policy on ``examples``: always the one answer that is
    right most often."""
    counts: dict[str, int] = {}
    for example in examples:
        for answer in set(example.answers):
            counts[answer] = counts.get(answer, 0) + 1
    return max(counts.values()) / len(examples)


def to_dataset(examples: Sequence[Example]):
    """A ``datasets.Dataset`` in TRL's conversational image format (``prompt``, ``image``,
    ``answers`` columns; ``answers`` reaches the reward function)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": example.question}] for example in examples],
            "image": [example.image for example in examples],
            "answers": [list(example.answers) for example in examples],
        }
    )
