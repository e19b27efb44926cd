"""``saei-fast demo``: the synthetic task, the reward, and short runs that write every output."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from saei_fast.cli import main
from saei_fast.demo.model import demo_model, demo_processor
from saei_fast.demo.options import DemoOptions
from saei_fast.demo.run import run_demo
from saei_fast.demo.task import (
    COLOURS,
    GRID,
    IMAGE_SIDE,
    chance_level,
    colour_examples,
    exact_answer_reward,
    load_jsonl,
    task_words,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared CPU spinning
    OpenMP threads slow them down several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the task -------------------------------------------------------------------------------


def nearest_colour_counts(image: Image.Image) -> dict[str, int]:
    """Cells per colour name, each cell assigned to the nearest palette colour."""
    pixels = np.asarray(image, dtype=np.float64)
    cell = IMAGE_SIDE // GRID
    palette = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
    counts = dict.fromkeys(COLOURS, 0)
    for top in range(GRID):
        for left in range(GRID):
            block = pixels[top * cell : (top + 1) * cell, left * cell : (left + 1) * cell]
            assert (block == block[0, 0]).all()  # one flat colour per cell
            name = min(palette, key=lambda n: np.abs(block[0, 0] - palette[n]).sum())
            counts[name] += 1
    return counts


def test_colour_examples_answer_the_majority_colour():
    examples = colour_examples(40, seed=5)
    assert {e.answer for e in examples} == set(COLOURS)  # every answer occurs
    for example in examples:
        assert example.image.size == (IMAGE_SIDE, IMAGE_SIDE)
        counts = nearest_colour_counts(example.image)
        assert max(counts, key=counts.get) == example.answer
        assert 10 <= counts[example.answer] <= 13 and sum(v > 0 for v in counts.values()) == 2
    again = colour_examples(40, seed=5)
    assert [np.asarray(e.image).tobytes() for e in again] == [
        np.asarray(e.image).tobytes() for e in examples
    ]
    assert chance_level() == 0.25


def test_exact_answer_reward():
    completions = [[{"role": "assistant", "content": c}] for c in ("red", " red ", "Red", "red.")]
    assert exact_answer_reward(completions, ["red"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert exact_answer_reward(["blue", "green"], ["blue", "blue"]) == [1.0, 0.0]


def test_processor_tokenizes_the_task_and_matches_the_model():
    processor = demo_processor(task_words())
    model = demo_model(processor, hidden_size=32)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("what colour covers most of the image ?")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 8
    for colour in COLOURS:  # every answer is one token
        assert len(tokenizer(colour)["input_ids"]) == 1


def test_load_jsonl(tmp_path):
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "a.png", "question": "which colour?", "answer": "red"}\n\n'
    )
    (example,) = load_jsonl(tmp_path / "data.jsonl")
    assert (example.question, example.answer, example.image.size) == (
        "which colour?",
        "red",
        (28, 28),
    )
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "answer": "red"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 must be a JSON object with 'image'"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_demo_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--steps must be an integer >= 1, got 0"):
        run_demo(DemoOptions(steps=0, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="arms must be a non-empty subset"):
        run_demo(DemoOptions(arms=("grpo",), output_dir=str(tmp_path)))


# ---- short runs -----------------------------------------------------------------------------


def test_demo_command_short_mode_writes_metrics_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--output-dir", str(out), "--eval-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[vanilla] step   2/2" in printed and "[saei   ] step   2/2" in printed
    assert "saei-fast demo summary" in printed

    files = sorted(path.name for path in out.iterdir())
    assert files == ["entropy_reward.png", "metrics.csv", "metrics.json", "summary.txt"]
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["arms"]) == {"vanilla", "saei"}
    for arm, log in record["arms"].items():
        assert [e["step"] for e in log["steps"]] == [1, 2]
        assert [e["step"] for e in log["heldout"]] == [0, 1, 2]
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in log["heldout"])
        has_attack = all("saei/entropy_before" in e for e in log["steps"])
        assert has_attack == (arm == "saei")
    vanilla, saei = record["arms"]["vanilla"], record["arms"]["saei"]
    # Same seed, same weights, same prompts: the untrained model scores the same, and its
    # first-step policy entropy (of the single answer token, which depends on the prompt
    # and image only) is the same in both arms.
    assert vanilla["heldout"][0] == saei["heldout"][0]
    assert vanilla["steps"][0]["entropy"] == pytest.approx(saei["steps"][0]["entropy"], abs=1e-5)

    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arm"], r["step"]) for r in rows] == [
        ("vanilla", "1"), ("vanilla", "2"), ("saei", "1"), ("saei", "2")
    ]  # fmt: skip
    assert float(rows[2]["saei/entropy_before"]) == saei["steps"][0]["saei/entropy_before"]

    with Image.open(out / "entropy_reward.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 1000
    summary = (out / "summary.txt").read_text()
    assert "vanilla" in summary and "SaEI attack" in summary and "chance accuracy 0.25" in summary


def test_demo_runs_a_local_model_folder_and_jsonl_dataset(tmp_path, capsys):
    processor = demo_processor(task_words())
    demo_model(processor, hidden_size=32).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lines = []
    for index, example in enumerate(colour_examples(12, seed=7)):
        example.image.save(tmp_path / f"{index}.png")
        row = {"image": f"{index}.png", "question": example.question, "answer": example.answer}
        lines.append(json.dumps(row))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    summary = run_demo(
        DemoOptions(
            steps=1,
            output_dir=str(tmp_path / "out"),
            model=str(tmp_path / "model"),
            dataset=str(tmp_path / "data.jsonl"),
            arms=("saei",),
        )
    )
    assert "data.jsonl (10 train / 2 held-out)" in summary["task"]
    assert set(summary["arms"]) == {"saei"}
    assert (tmp_path / "out" / "entropy_reward.png").stat().st_size > 0
    assert "saei-fast demo summary" in capsys.readouterr().out


def test_demo_command_names_missing_dependencies(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name)
    )
    assert main(["demo", "--steps", "1"]) == 2
    assert "needs matplotlib: pip install 'saei-fast[demo]'" in capsys.readouterr().err


def test_above_chance_means_beyond_an_image_blind_policy_by_two_standard_errors():
    from saei_fast.demo.run import TINY_RECIPE, Setup, summarize
    from saei_fast.demo.task import Example

    def verdict(answers: list[str], accuracy: float) -> bool:
        heldout = [Example(None, "q", answer) for answer in answers]
        setup = Setup(None, None, [], heldout, 0.25, TINY_RECIPE, "test")
        steps = [{"step": 1, "reward": 0.5, "entropy": 1.0}]
        log = {"steps": steps, "heldout": [{"accuracy": 0.0}, {"accuracy": accuracy}], "seconds": 1}
        summary = summarize({"vanilla": log}, setup, DemoOptions(steps=1), parameters=1)
        return summary["arms"]["vanilla"]["above_chance"]

    balanced = list(COLOURS) * 32  # 128 answers, 32 each: threshold 0.25 + 2 * 0.0383
    assert verdict(balanced, 0.33) and not verdict(balanced, 0.32)
    skewed = ["red"] * 64 + ["blue"] * 64  # answering "red" always scores 0.5
    assert not verdict(skewed, 0.55) and verdict(skewed, 0.6)
