"""SaEIGRPOTrainer refuses to train on vLLM samples drawn from a twice-expanded prompt (TRL
issues 6294 / 6401), checked at the first generation against the prompt lengths the engine
reports, on a stand-in backend with vLLM's contract (vLLM is not part of the test
environment)."""

from __future__ import annotations

import pytest
import torch
from trl_helpers import GROUP, N_CLEAN, FakeVLLMServer, Rewards, make_config

from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.integrations.trl.vllm_prompts import ReportedPrompts, length_mismatches
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    # shared_fixtures.py: one intra-op thread for the whole module (tiny models).
    pytest.mark.usefixtures("one_thread"),
]


def vllm_trainer(processor, examples, tmp_path, mode: str, **overrides):
    """A trainer in the state TRL's __init__ leaves for ``use_vllm=True`` (which needs
    vLLM), generating through the stand-in."""
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(tmp_path, **overrides),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )
    fake = FakeVLLMServer(model, processor, max_tokens=4, mode=mode)
    trainer.use_vllm, trainer.vllm_mode, trainer.vllm_generation = True, mode, fake
    trainer._last_loaded_step = trainer.state.global_step
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    return trainer, fake, inputs


@pytest.mark.parametrize("saei_enabled", [True, False])
def test_colocate_double_expansion_is_refused_at_the_first_generation(
    processor, examples, tmp_path, saei_enabled
):
    trainer, fake, inputs = vllm_trainer(
        processor, examples, tmp_path, "colocate", saei_enabled=saei_enabled
    )
    with pytest.raises(RuntimeError, match="issues/6294") as error:
        trainer._generate_and_score_completions(inputs)
    # Raised after the first engine call: no attack, no adversarial generation.
    assert len(fake.calls) == 1
    assert fake.calls[0]["n"] == (N_CLEAN if saei_enabled else GROUP)
    prompt = fake.calls[0]["prompts"][0]
    image_tokens = prompt.count(trainer.model.config.image_token_id)
    assert image_tokens > 1  # the processor expanded the placeholder
    message = str(error.value)
    assert f"prompt of {len(prompt) + image_tokens - 1} tokens for row 0" in message
    assert f"trainer's prompt has {len(prompt)}" in message
    assert "issues/6401" in message and "colocate mode" in message


def test_server_mode_prompts_pass_the_check(processor, examples, tmp_path):
    trainer, fake, inputs = vllm_trainer(processor, examples, tmp_path, "server")
    output = trainer._generate_and_score_completions(inputs)
    assert len(fake.calls) == 2  # clean, then adversarial rows
    backend = trainer.vllm_generation
    assert isinstance(backend, ReportedPrompts) and backend.backend is fake
    # The latest call's report was compared with the rows sent (the adversarial ones).
    assert backend.reported == fake.calls[-1]["prompts"]
    assert output["completion_ids"].shape[0] == 2 * GROUP


def test_a_fixed_trl_passes_and_the_bug_fails(processor):
    """The check compares vLLM's prompt with the trainer's, not with what TRL sent: a TRL
    that sends one placeholder per image (expanded once by vLLM) passes it."""
    model = demo_model(processor, hidden_size=32, seed=0)
    image = model.config.image_token_id
    trainer_ids = [[1, 2, image, image, image, image, 3], [4, image, image, 5]]
    expanded_once = [list(ids) for ids in trainer_ids]  # vLLM's own expansion of one placeholder
    assert length_mismatches(trainer_ids, expanded_once) == []
    twice = [
        FakeVLLMServer(model, processor, 1, mode="colocate").reported_prompt(ids)
        for ids in trainer_ids
    ]
    assert length_mismatches(trainer_ids, twice) == [(0, 7, 10), (1, 4, 5)]
    assert length_mismatches(trainer_ids, None) == []  # a backend that reports nothing
    with pytest.raises(ValueError, match="reported 1 prompts for 2 rows"):
        length_mismatches(trainer_ids, twice[:1])
