"""SaEIGRPOTrainer with completions that end before ``max_completion_length``, mixed with
full-length ones, through real TRL training steps on a tiny Qwen2.5-VL.

The other trainer tests suppress every stop token, so every completion is exactly
``max_completion_length`` long and the completion mask is all True; there, a Dr. GRPO
normalisation by the batch's width instead of ``max_completion_length``, or a metric that
counts padding, gives the right number. Here ``generate`` returns completions cut by an end
token at chosen lengths (what a model that stops early returns: the end token, then
padding): the first step mixes full-length and short rows, the second has only short ones,
so that the batch is narrower than ``max_completion_length``. The expected values come from
the crafted lengths and a plain forward of the model, not from the trainer's masks.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from trl_helpers import GROUP, N_ADV, TRAINER_MARKS, make_trainer
from trl_variations import GenerateRecorder, attack_beside_naive, record_loss_calls, trimmed

import saei_fast.integrations.trl.sampling as integration
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS

MAX_LENGTH = 5
# Completion lengths (end token included) per generate call, rows in call order: step 1's
# clean and adversarial calls mix full-length rows with short ones (one is the end token
# alone); step 2's are all short, 3 tokens at most.
LENGTHS = [[5, 2, 1, 4], [3, 5, 2, 5], [2, 3, 1, 2], [3, 1, 2, 3]]


def _cut_early(eos: int, pad: int):
    """A ``GenerateRecorder`` edit: the completions of call ``i`` cut at ``LENGTHS[i]``, the
    end token at the last position, padding after it."""

    def edit(call: int, output: torch.Tensor, prompt: int) -> None:
        assert output.shape[1] - prompt == MAX_LENGTH  # stop tokens suppressed
        for row, length in enumerate(LENGTHS[call]):
            if length < MAX_LENGTH:
                output[row, prompt + length - 1] = eos
                output[row, prompt + length :] = pad

    return edit


@pytest.fixture(scope="module")
def short_run(processor, examples, tmp_path_factory):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    # A random tiny model is near uniform at every position (entropy ~ log V); a sharper
    # head spreads the entropies, so that a mean over the padding too is another number.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    assert eos != pad
    crafted = GenerateRecorder(model, _cut_early(eos, pad))
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path_factory.mktemp("short"),
        max_completion_length=MAX_LENGTH,
        loss_type="dr_grpo",
        # The fused loss checks its own value against TRL's on every step: its Dr. GRPO
        # normalisation is exercised with a batch narrower than max_completion_length.
        saei_fused_loss=True,
    )
    losses = record_loss_calls(trainer, trainer.args.temperature)
    # Each attack beside the naive objective of a batch built here from the clean generate
    # call, with the model as the attack finds it.
    attacks = []
    attack = attack_beside_naive(crafted, eos, pad, attacks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integration, "entropy_attack", attack)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {
        "trainer": trainer,
        "crafted": crafted,
        "losses": losses,
        "logs": logs,
        "eos": eos,
        "attacks": attacks,
    }


def test_completions_end_where_crafted_and_the_batch_is_narrower(short_run):
    eos = short_run["eos"]
    losses = short_run["losses"]
    assert len(losses) == 2 and len(short_run["crafted"].completions) == 4
    for step, record in enumerate(losses):
        lengths = [len(trimmed(row, eos)) for row in record["completion_ids"]]
        crafted = LENGTHS[2 * step] + LENGTHS[2 * step + 1]
        assert sorted(lengths) == sorted(crafted)
        assert record["completion_ids"].shape[1] == max(crafted)
    assert losses[1]["completion_ids"].shape[1] < MAX_LENGTH


def _loss_rows(short_run, step):
    """Per loss row: real-token mask from the completion ids (through the first end token)
    and whether the row was sampled from the adversarial image, checked against what the
    crafted generate calls returned."""
    eos = short_run["eos"]
    record = short_run["losses"][step]
    ids = record["completion_ids"]
    lengths = torch.tensor([len(trimmed(row, eos)) for row in ids])
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    adversarial = record["saei_is_adversarial"].bool()
    # The (completion, arm) pairs of the loss rows are those the two generate calls
    # returned: clean call -> clean rows, adversarial call -> adversarial rows.
    clean_call, adv_call = short_run["crafted"].completions[2 * step : 2 * step + 2]
    expected = Counter(
        [(trimmed(row, eos), False) for row in clean_call]
        + [(trimmed(row, eos), True) for row in adv_call]
    )
    got = Counter((trimmed(row, eos), bool(a)) for row, a in zip(ids, adversarial, strict=True))
    assert got == expected
    assert int(adversarial.sum()) == 2 * N_ADV and len(ids) == 2 * GROUP
    return record, lengths, mask, adversarial


@pytest.mark.parametrize("step", [0, 1])
def test_dr_grpo_loss_is_normalised_by_max_completion_length(short_run, step):
    """On-policy (one generation per step, one iteration) every ratio is 1, so Dr. GRPO's
    loss is ``-sum_i A_i * |o_i| / (B * max_completion_length)``: the padding counts
    nothing, the normaliser is the setting, not the batch's width."""
    record, lengths, _, _ = _loss_rows(short_run, step)
    advantages = record["advantages"].double()
    expected = -(advantages * lengths).sum() / (len(lengths) * MAX_LENGTH)
    assert abs(float(expected)) > 1e-3  # full-length rows alone would give 0
    assert float(record["loss"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("step", [0, 1])
def test_entropy_split_metrics_ignore_padding(short_run, step):
    """``saei/entropy_clean_rows`` / ``saei/entropy_adv_rows``: the token mean of the loss
    forward's entropy over the real tokens of clean / adversarial rows; TRL's ``entropy``
    is the token mean over both."""
    record, _, mask, adversarial = _loss_rows(short_run, step)
    entropies = record["entropies"]
    entry = short_run["logs"][step]
    for name, rows in (("clean", ~adversarial), ("adv", adversarial)):
        tokens = mask & rows[:, None]
        expected = float(entropies[tokens].mean())
        assert entry[f"saei/entropy_{name}_rows"] == pytest.approx(expected, rel=1e-5)
        # What counting the padding would give is another number.
        padded = float(entropies[rows].mean())
        assert padded != pytest.approx(expected, rel=1e-2)
    assert entry["entropy"] == pytest.approx(float(entropies[mask].mean()), rel=1e-5)
    assert sum(LENGTHS[2 * step]) + sum(LENGTHS[2 * step + 1]) == int(mask.sum())


@pytest.mark.parametrize("step", [0, 1])
def test_attack_objective_over_early_ending_completions(short_run, step):
    """The attack measures the band objective over the clean rows' real completion tokens
    (end token included, padding not): the naive full-logits objective of the same rows."""
    attack = short_run["attacks"][step]
    lengths = attack["mask"].sum(1).tolist()
    assert sorted(lengths) == sorted(LENGTHS[2 * step])
    result = attack["result"]
    assert result.entropy_before == pytest.approx(attack["naive"], rel=1e-4)
    assert short_run["logs"][step]["saei/entropy_before"] == pytest.approx(result.entropy_before)
