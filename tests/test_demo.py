"""``saei-fast demo``: the task, the reward, the statistics, the command's user errors, and
shrunken end-to-end runs that write every output."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from saei_fast.cli import main
from saei_fast.tools.demo.model import demo_model, demo_processor
from saei_fast.tools.demo.options import DemoOptions
from saei_fast.tools.demo.run import run_demo
from saei_fast.tools.demo.stats import paired_difference, t_cdf_two_sided, t_quantile_two_sided
from saei_fast.tools.demo.task import (
    COLOURS,
    GRID,
    IMAGE_SIDE,
    answer_reward,
    blind_accuracy,
    colour_examples,
    load_jsonl,
    task_words,
)

# shared_fixtures.py: one intra-op thread for the whole module (tiny models).
pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_colour_examples_name_both_colours_in_either_order():
    examples = colour_examples(60, seed=5)
    for example in examples:
        assert example.image.size == (IMAGE_SIDE, IMAGE_SIDE)
        present = {name: n for name, n in nearest_colour_counts(example.image).items() if n}
        assert len(present) == 2 and 1 <= min(present.values()) <= 3
        a, b = present
        assert set(example.answers) == {f"{a} and {b}", f"{b} and {a}"}
    assert {c for e in examples for c in e.answers[0].split(" and ")} == set(COLOURS)
    again = colour_examples(60, seed=5)
    assert [np.asarray(e.image).tobytes() for e in again] == [
        np.asarray(e.image).tobytes() for e in examples
    ]


def test_answer_reward_accepts_any_listed_answer():
    completions = [
        [{"role": "assistant", "content": c}] for c in ("red and blue", " blue and red ")
    ]
    answers = [("red and blue", "blue and red")] * 2
    assert answer_reward(completions, answers) == [1.0, 1.0]
    wrong = ["red and red", "Red and blue", "red and blue.", "red blue"]
    assert answer_reward(wrong, [("red and blue",)] * 4) == [0.0] * 4


def test_blind_accuracy_is_the_best_single_answer():
    examples = colour_examples(40, seed=3)
    best = max(sum(answer in e.answers for e in examples) for e in examples for answer in e.answers)
    assert blind_accuracy(examples) == best / 40


def test_processor_tokenizes_the_task_and_answers_are_three_tokens():
    processor = demo_processor(task_words())
    model = demo_model(processor, hidden_size=32)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("which colours are in the image ?")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 7
    for answer in colour_examples(20, seed=0)[0].answers:
        assert len(tokenizer(answer)["input_ids"]) == 3


def test_load_jsonl_reads_answers_and_names_bad_lines(tmp_path):
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "notimage.png").write_text("not an image")
    good = (
        '{"image": "a.png", "question": "which colour?", "answer": "red"}\n\n'
        '{"image": "a.png", "question": "q", "answer": ["red", "crimson"]}\n'
    )
    (tmp_path / "data.jsonl").write_text(good)
    first, second = load_jsonl(tmp_path / "data.jsonl")
    assert (first.question, first.answers, first.image.size) == (
        "which colour?",
        ("red",),
        (28, 28),
    )
    assert second.answers == ("red", "crimson")
    bad_lines = {
        '{"image": "a.png", "answer": "red"}': r"bad\.jsonl:2 must be a JSON object with 'image'",
        '{"image": "b.png", "question": "q", "answer": "red"}': r"bad\.jsonl:2: image .*b\.png",
        '{"image": "notimage.png", "question": "q", "answer": "red"}': r":2: .* not a readable",
        '{"image": "a.png", "question": "q", "answer": []}': r":2: 'answer' must be",
    }
    for line, message in bad_lines.items():
        (tmp_path / "bad.jsonl").write_text(good.splitlines()[0] + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            load_jsonl(tmp_path / "bad.jsonl")


# ---- statistics -----------------------------------------------------------------------------


def test_t_distribution_matches_closed_forms_and_tables():
    # df = 1 is Cauchy: P(|T| <= 1) = 1/2; df = 2: P(|T| <= t) = t / sqrt(2 + t^2).
    assert t_cdf_two_sided(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    for t in (0.3, 2.0, 7.5):
        assert t_cdf_two_sided(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), abs=1e-15)
    # Published 97.5% quantiles of Student's t.
    table = {
        1: 12.706204736174707,
        2: 4.302652729749464,
        3: 3.182446305284263,
        9: 2.262157162798205,
    }
    for dof, quantile in table.items():
        assert t_quantile_two_sided(0.95, dof) == pytest.approx(quantile, rel=1e-12)


def test_paired_difference_against_a_hand_computation():
    # differences 0.20, 0.05, 0.25: mean 1/6; squared deviations 1/900 + 49/3600 + 1/144 =
    # 13/600, sd = sqrt(13/1200), half width t(2) * sd / sqrt(3) = t(2) * sqrt(13) / 60.
    result = paired_difference([0.50, 0.40, 0.45], [0.30, 0.35, 0.20])
    half = 4.302652729749464 * math.sqrt(13) / 60
    assert result["mean"] == pytest.approx(1 / 6, rel=1e-12)
    assert result["sd"] == pytest.approx(math.sqrt(13 / 1200), rel=1e-12)
    assert result["ci95"] == pytest.approx([1 / 6 - half, 1 / 6 + half], rel=1e-12)
    assert result["differences"] == pytest.approx([0.20, 0.05, 0.25])
    assert paired_difference([1.0], [0.25]) == {
        "mean": 0.75, "ci95": None, "sd": None, "n": 1, "differences": [0.75]
    }  # fmt: skip
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([1.0, 2.0], [1.0])


# ---- the command's user errors --------------------------------------------------------------


def _jsonl_with(tmp_path, name: str, image_line: str) -> str:
    Image.new("RGB", (28, 28), (0, 0, 255)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    rows = [{"image": "ok.png", "question": "q", "answer": "blue"}] * 2
    lines = [json.dumps(row) for row in rows] + [image_line]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def user_errors(tmp_path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "a-file").write_text("")
    missing = '{"image": "gone.png", "question": "q", "answer": "blue"}'
    junk = '{"image": "junk.png", "question": "q", "answer": "blue"}'
    return {
        "model": (["--model", "/nonexistent"], "--model /nonexistent is not a folder"),
        "dataset": (["--dataset", str(tmp_path / "none.jsonl")], "none.jsonl is not a file"),
        "missing image": (
            ["--dataset", _jsonl_with(tmp_path, "a.jsonl", missing)],
            r"a.jsonl:3: image",
        ),
        "not an image": (
            ["--dataset", _jsonl_with(tmp_path, "b.jsonl", junk)],
            r"b.jsonl:3: .*junk.png",
        ),
        "output is a file": (["--output-dir", str(tmp_path / "a-file")], "is a file, not a folder"),
        "output in a file": (
            ["--output-dir", str(tmp_path / "a-file" / "out")],
            "is inside the file",
        ),
        "steps": (["--steps", "0"], "--steps must be >= 1, got 0"),
        "steps type": (["--steps", "many"], "argument --steps: invalid int value"),
        "arms": (["--arms", "vanilla,grpo"], "--arms: unknown arm 'grpo'"),
        "seeds": (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        "alpha": (["--alpha", "nan"], "--alpha must be a number in"),
    }


USER_ERRORS = (
    "model", "dataset", "missing image", "not an image", "output is a file", "output in a file",
    "steps", "steps type", "arms", "seeds", "alpha",
)  # fmt: skip


@pytest.mark.parametrize("case", USER_ERRORS)
def test_demo_user_errors_are_one_line_before_any_work(case, tmp_path, capsys):
    arguments, message = user_errors(tmp_path)[case]
    out, cache = tmp_path / "out", tmp_path / "cache"
    if "--output-dir" not in arguments:
        arguments = [*arguments, "--output-dir", str(out)]
    try:
        status = main(["demo", "--cache-dir", str(cache), *arguments])
    except SystemExit as exit_:  # argparse's own errors exit from inside the parser
        status = exit_.code
    assert status == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("saei-fast demo: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists() and not cache.exists()


def test_demo_command_names_missing_dependencies(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name)
    )
    assert main(["demo", "--steps", "1"]) == 2
    assert capsys.readouterr().err == (
        "saei-fast demo: error: needs matplotlib: pip install 'saei-fast[demo]'\n"
    )


# ---- shrunken runs --------------------------------------------------------------------------

ARM_KEYS = {
    "entropy_clean_first", "entropy_clean_last", "accuracy_first", "accuracy_last",
    "pass_at_k_first", "pass_at_k_last", "distinct_first", "distinct_last",
    "train_entropy_clean_last", "train_reward_last", "frac_reward_zero_std_mean", "seconds",
}  # fmt: skip
ATTACK_KEYS = {
    "relative_gain_median", "negative_gain_fraction", "distinct_answers_clean",
    "distinct_answers_adv", "entropy_before_mean", "entropy_after_mean", "steps_measured",
}  # fmt: skip


def test_demo_three_arms_two_seeds_end_to_end(tmp_path, capfd):
    out, cache = tmp_path / "out", tmp_path / "cache"
    arguments = [
        "demo", "--output-dir", str(out), "--cache-dir", str(cache), "--seeds", "0,1",
        "--steps", "2", "--eval-every", "1", "--eval-size", "4", "--samples", "2",
        "--warmup-steps", "2", "--workers", "2",
    ]  # fmt: skip
    assert main(arguments) == 0
    printed = capfd.readouterr().out  # the forked workers write to the file descriptor
    for seed in (0, 1):
        assert f"[seed {seed} warm-up] step   2/2" in printed
        for arm in ("vanilla", "saei   ", "control"):
            assert f"[seed {seed} {arm}] step   2/2" in printed

    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.csv", "metrics.json", "plots", "summary.json", "summary.txt"
    ]  # fmt: skip
    assert len(list((out / "plots").glob("*.png"))) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert set(summary["arms"]) == {"vanilla", "saei", "control"}
    for values in summary["arms"].values():
        assert set(values) == ARM_KEYS
        assert all(len(v) == 2 for v in values.values())
    for name in ("saei-vanilla", "saei-control"):
        for metric in ("entropy_clean_last", "accuracy_last", "pass_at_k_last"):
            result = summary["paired"][name][metric]
            first, second = name.split("-")
            expected = paired_difference(
                summary["arms"][first][metric], summary["arms"][second][metric]
            )
            # Key by key: pytest.approx takes no nested dictionaries (ci95 is a pair).
            assert set(result) == set(expected)
            for key, value in expected.items():
                assert result[key] == pytest.approx(value), key
            assert result["ci95"][0] <= result["mean"] <= result["ci95"][1]
    assert set(summary["attack"]) == ATTACK_KEYS == set(summary["control_perturbation"])
    assert summary["attack"]["steps_measured"] == 4  # 2 steps x 2 seeds

    record = json.loads((out / "metrics.json").read_text())
    runs = {(r["seed"], r["arm"]): r for r in record["runs"]}
    for seed in (0, 1):
        # Same warm start and evaluation samples: every arm starts from the same numbers.
        starts = [runs[seed, arm]["evals"][0] for arm in ("vanilla", "saei", "control")]
        assert starts[0] == starts[1] == starts[2]
        assert [e["step"] for e in runs[seed, "saei"]["evals"]] == [0, 1, 2]
        assert "frac_reward_zero_std" in runs[seed, "vanilla"]["steps"][0]
        assert "saei/entropy_gain_relative" in runs[seed, "control"]["steps"][0]
    assert runs[0, "vanilla"]["evals"][0] != runs[1, "vanilla"]["evals"][0]
    assert len(list(cache.glob("warmup-seed*.pt"))) == 2
    text = (out / "summary.txt").read_text()
    assert "paired difference saei-vanilla" in text and "SaEI attack" in text


def test_demo_runs_a_local_model_folder_and_jsonl_dataset(tmp_path, capsys):
    processor = demo_processor(task_words())
    demo_model(processor, hidden_size=32).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lines = []
    for index, example in enumerate(colour_examples(12, seed=7)):
        example.image.save(tmp_path / f"{index}.png")
        row = {"image": f"{index}.png", "question": example.question, "answer": example.answers}
        lines.append(json.dumps(row))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    summary = run_demo(
        DemoOptions(
            output_dir=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "cache"),
            seeds=(0,),
            steps=1,
            samples=2,
            model=str(tmp_path / "model"),
            dataset=str(tmp_path / "data.jsonl"),
            arms=("saei",),
        )
    )
    assert "data.jsonl (10 train / 2 held-out)" in summary["task"]
    assert set(summary["arms"]) == {"saei"} and summary["paired"] == {}
    assert summary["attack"]["steps_measured"] == 1
    assert not (tmp_path / "cache").exists()  # a local model has no warm start by default
    assert "saei-fast demo summary" in capsys.readouterr().out
