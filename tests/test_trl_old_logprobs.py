"""SaEIGRPOTrainer with ``num_iterations=2``: TRL then computes the old-policy log-probs at
scoring time, which SaEI requires on the CLEAN image for every row, adversarial rows too.

The other trainer tests run one iteration per generation, where TRL skips the old-policy pass
(the ratio's denominator is the current log-prob, detached), so a pass that read the
adversarial images for the adversarial rows would go unseen. Expected values come from a
plain forward of the model on each row's clean image as the processor gives it.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import GROUP, N_ADV, N_CLEAN, TRAINER_MARKS, make_trainer
from trl_variations import GenerateRecorder

from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS


@pytest.mark.parametrize("fused_head", [True, False])
def test_old_logprobs_use_the_clean_image_for_every_row(processor, examples, tmp_path, fused_head):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = GenerateRecorder(model)
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        num_iterations=2,
        saei_alpha=64 / 255,  # a large step: the adversarial image's log-probs differ
        saei_fused_head=fused_head,
    )
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)
    old = output["old_per_token_logps"]
    assert old is not None and old.shape == output["completion_ids"].shape

    # Every row's clean image, from the processor (rows 0..3: example 0, rows 4..7: example 1).
    clean = processor.image_processor(
        [examples[row // GROUP].image for row in range(2 * GROUP)], return_tensors="pt"
    )
    assert torch.equal(output["pixel_values"], clean["pixel_values"])
    completion = output["completion_ids"]
    input_ids = torch.cat([output["prompt_ids"], completion], 1)
    image_token = model.config.image_token_id

    def logprobs(pixel_values):
        with torch.no_grad():
            logits = model(
                input_ids=input_ids,
                attention_mask=torch.cat([output["prompt_mask"], output["completion_mask"]], 1),
                pixel_values=pixel_values,
                image_grid_thw=clean["image_grid_thw"],
                mm_token_type_ids=(input_ids == image_token).long(),
            ).logits[:, -completion.shape[1] - 1 : -1]
        return logits.double().log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)

    torch.testing.assert_close(old.double(), logprobs(clean["pixel_values"]), rtol=1e-5, atol=1e-5)
    is_adv = torch.tensor([False] * N_CLEAN + [True] * N_ADV).repeat(2)
    assert torch.equal(output["saei_is_adversarial"].cpu(), is_adv)
    # Under the images the adversarial rows were sampled from, their log-probs differ: the
    # check above tells the two images apart.
    clean_blocks = clean["pixel_values"].split(len(clean["pixel_values"]) // (2 * GROUP))
    adv_call = recorder.inputs[1]["pixel_values"]
    adv_blocks = adv_call.split(len(adv_call) // (2 * N_ADV))
    sampled = [
        adv_blocks[(row // GROUP) * N_ADV + row % GROUP - N_CLEAN] if is_adv[row] else block
        for row, block in enumerate(clean_blocks)
    ]
    shift = (logprobs(torch.cat(sampled)) - old.double()).abs()
    assert shift[is_adv].max() > 1e-3 and shift[~is_adv].max() < 1e-5
