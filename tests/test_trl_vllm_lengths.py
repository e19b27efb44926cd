"""SaEIGRPOTrainer's treatment of the adversarial rows' vLLM importance-sampling correction
when completions end early: ragged engine outputs, padded by TRL.

test_trl_integration.py checks the correction with full-length completions only, where a
statistic over every position of a row and one over its real tokens agree. Here the stand-in
backend ends rows early (an end token, then nothing: vLLM returns ragged lists), so
``saei/adv_sampling_logp_shift`` (mean over the adversarial rows' real tokens of
``log p_sampling - log p_clean``) and ``saei/adv_is_dropped_fraction`` (the share of those
tokens that TRL's correction would have zeroed) must leave the padding out. Expected values
are computed from what the backend returned and the trainer's clean-image log-probs.
"""

from __future__ import annotations

import math

import pytest
import torch
from trl_helpers import GROUP, N_ADV, N_CLEAN, FakeVLLMServer, Rewards, make_config

from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

MAX_TOKENS = 4
# Completion lengths per backend call (clean rows, then adversarial rows), rows in call order.
LENGTHS = [[4, 2, 1, 3], [2, 4, 1, 3]]
EOS_LOGPROB = -0.5  # what the stand-in reports for the end token it puts in


class EarlyEndingServer(FakeVLLMServer):
    """The stand-in backend, with each call's completions cut at ``LENGTHS``: the end token
    last, no padding (vLLM's ragged output), log-probs cut alike."""

    def __init__(self, *args, eos: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eos = eos

    def generate(self, prompts, images, num_generations, profiler=None):
        reported, completions, logps, extra = super().generate(prompts, images, num_generations)
        lengths = LENGTHS[len(self.calls) - 1]
        cut_ids, cut_logps = [], []
        for ids, lps, length in zip(completions, logps, lengths, strict=True):
            ids, lps = list(ids[:length]), [list(lp) for lp in lps[:length]]
            if length < MAX_TOKENS:
                ids[-1], lps[-1] = self.eos, [EOS_LOGPROB]
            cut_ids.append(ids)
            cut_logps.append(lps)
        self.calls[-1]["cut"] = (cut_ids, cut_logps)
        return reported, cut_ids, cut_logps, extra


@pytest.mark.parametrize("mode", ["sequence_mask", "token_mask"])
def test_adversarial_correction_metrics_ignore_padding(processor, examples, tmp_path, mode):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(tmp_path, saei_alpha=64 / 255, max_completion_length=MAX_TOKENS),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )
    fake = EarlyEndingServer(
        model, processor, max_tokens=MAX_TOKENS, eos=processor.tokenizer.eos_token_id
    )
    # The state TRL's __init__ sets for use_vllm=True, vllm_mode="server" (which needs vLLM).
    trainer.use_vllm, trainer.vllm_mode, trainer.vllm_generation = True, "server", fake
    trainer._last_loaded_step = trainer.state.global_step
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    # Bounds that keep the ordinary tokens of these rows and drop the end tokens.
    low, high = 0.5, 2.0
    trainer.vllm_importance_sampling_clip_min = low
    trainer.vllm_importance_sampling_clip_max = high
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)

    # Rows in group order: per group, its clean rows then its adversarial rows.
    (clean_ids, clean_lps), (adv_ids, adv_lps) = (call["cut"] for call in fake.calls)
    rows_ids, rows_lps, is_adv = [], [], []
    for group in range(2):
        rows_ids += clean_ids[group * N_CLEAN : (group + 1) * N_CLEAN]
        rows_lps += clean_lps[group * N_CLEAN : (group + 1) * N_CLEAN]
        rows_ids += adv_ids[group * N_ADV : (group + 1) * N_ADV]
        rows_lps += adv_lps[group * N_ADV : (group + 1) * N_ADV]
        is_adv += [False] * N_CLEAN + [True] * N_ADV
    is_adv = torch.tensor(is_adv)
    lengths = torch.tensor([len(ids) for ids in rows_ids])
    width = output["completion_ids"].shape[1]
    assert width == int(lengths.max()) == MAX_TOKENS
    mask = torch.arange(width)[None, :] < lengths[:, None]
    assert torch.equal(output["completion_mask"].bool(), mask)
    for row, ids in enumerate(rows_ids):
        assert output["completion_ids"][row, : len(ids)].tolist() == ids
    sampled = torch.zeros(len(rows_lps), width)
    for row, lps in enumerate(rows_lps):
        sampled[row, : len(lps)] = torch.tensor([lp[0] for lp in lps])
    old = output["old_per_token_logps"]

    # What TRL's correction would have done to each token, from the real tokens only.
    diff = (old - sampled) * mask
    if mode == "sequence_mask":
        trl_ratio = torch.exp(diff.sum(-1, keepdim=True)).expand_as(mask)
    else:
        trl_ratio = torch.exp(diff)
    dropped = (trl_ratio < low) | (trl_ratio > high)
    adv_tokens = mask & is_adv[:, None]
    want_dropped = float(dropped[adv_tokens].float().mean())
    want_shift = float((sampled - old)[adv_tokens].mean())
    # Some tokens are dropped (the end tokens, whose reported log-prob is far from the
    # model's), not all; counting the padding would give another fraction.
    assert 0 < want_dropped < 1
    assert want_dropped != pytest.approx(float(dropped[is_adv].float().mean()))
    logged = trainer._metrics["train"]
    assert logged["saei/adv_is_dropped_fraction"][-1] == pytest.approx(want_dropped)
    assert logged["saei/adv_sampling_logp_shift"][-1] == pytest.approx(want_shift, abs=1e-6)
    # Over every position (padding too) the shift is another number.
    padded_shift = float(torch.nan_to_num(sampled - old)[is_adv].mean())
    assert not math.isclose(padded_shift, want_shift, rel_tol=1e-3, abs_tol=1e-6)

    # The adversarial rows are kept whole (ratio 1), their sampling log-probs the clean ones.
    ratio = output["importance_sampling_ratio"]
    assert torch.equal(ratio[is_adv], torch.ones_like(ratio[is_adv]))
    torch.testing.assert_close(output["sampling_per_token_logps"][is_adv], old[is_adv])
    clean_ratio = trl_ratio.masked_fill(dropped, 0.0)
    if mode == "sequence_mask":
        clean_ratio = clean_ratio[:, :1]
    torch.testing.assert_close(ratio[~is_adv], clean_ratio[~is_adv])
