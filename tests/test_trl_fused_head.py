"""SaEIGRPOTrainer at production settings: saei-fast's fused head in TRL's loss passes
(against TRL's own head), ``cast_lm_head_to_fp32`` and LoRA (peft) policies."""

from __future__ import annotations

import copy

import pytest
import torch
from trl_helpers import GROUP, Rewards, make_config, no_stop_tokens

import saei_fast.integrations.shared.fused_head as fused_head
import saei_fast.integrations.trl.sampling as integration
from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset
from saei_fast.tools.testing import vlm_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    # shared_fixtures.py: one intra-op thread for the whole module (tiny models).
    pytest.mark.usefixtures("one_thread"),
]


def trainer_for(model, processor, examples, tmp_path, **overrides) -> SaEIGRPOTrainer:
    return SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(tmp_path, **overrides),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )


def loss_inputs(model, processor, examples, seed=0) -> dict:
    """What TRL's loss pass receives: prompt + completion rows, their images, and the
    number of completion positions to score."""
    batch = vlm_batch(
        model,
        processor.image_processor,
        [e.image for e in examples],
        group_size=2,
        seed=seed,
        completion_lengths=(3, 6),
    )
    inputs = batch.inputs
    width = int(batch.completion_mask.any(0).nonzero().min())
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"] * 1,
        "logits_to_keep": inputs["input_ids"].shape[1] - width,
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
        "num_images": [1] * inputs["input_ids"].shape[0],
        "mm_token_type_ids": inputs["mm_token_type_ids"],
    }


def logps_entropies_grads(trainer, inputs):
    """Log-probs, entropies and parameter gradients of one loss-like pass."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, compute_entropy=True, **inputs
    )
    weights = torch.linspace(-1, 1, logps.shape[1], dtype=logps.dtype)
    (logps * weights + 0.5 * entropies).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), grads


def count_fused_calls(monkeypatch) -> list:
    calls, original = [], fused_head.linear_logprobs_and_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_head, "linear_logprobs_and_entropy", counting)
    return calls


@pytest.mark.parametrize(
    ("dtype", "settings"),
    [
        (torch.float32, {}),
        # Temperature and a logit multiplier: TRL's head computes logits * scale / T.
        (torch.float32, {"temperature": 0.7, "logit_scale": 1.5}),
        (torch.bfloat16, {}),
        (torch.bfloat16, {"cast_lm_head_to_fp32": True}),
    ],
)
def test_fused_head_equals_trls_head(processor, examples, tmp_path, monkeypatch, dtype, settings):
    settings = dict(settings)
    base = demo_model(processor, hidden_size=32, seed=0).to(dtype)
    scale = settings.pop("logit_scale", None)
    if scale is not None:
        base.config.text_config.logit_scale = scale
    calls = count_fused_calls(monkeypatch)
    ours = trainer_for(
        copy.deepcopy(base), processor, examples, tmp_path, saei_fused_head=True, **settings
    )
    theirs = trainer_for(
        copy.deepcopy(base), processor, examples, tmp_path, saei_fused_head=False, **settings
    )
    inputs = loss_inputs(base, processor, examples)
    logps, entropies, grads = logps_entropies_grads(ours, inputs)
    assert calls  # our head ran ...
    count = len(calls)
    want_logps, want_entropies, want_grads = logps_entropies_grads(theirs, inputs)
    assert len(calls) == count  # ... and TRL's did for the other trainer
    assert logps.dtype == want_logps.dtype == torch.float32
    scored = want_logps != 0
    assert bool(scored.any()) and torch.equal(logps != 0, scored)
    # Both accumulate in fp32 from the same inputs; only summation order differs.
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, want_entropies, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        want = want_grads[name].float()
        # fp32 gradients: the same arithmetic up to order; bf16 ones: one rounding apart.
        tolerance = 1e-4 if grad.dtype == torch.float32 else 2**-7
        scale = float(want.abs().max())
        torch.testing.assert_close(grad.float(), want, rtol=tolerance, atol=tolerance * scale)


def test_soft_capping_models_fall_back_to_trls_head(processor, examples, tmp_path, caplog):
    model = demo_model(processor, hidden_size=32, seed=0)
    model.config.text_config.final_logit_softcapping = 30.0
    with caplog.at_level("WARNING"):
        trainer = trainer_for(model, processor, examples, tmp_path, saei_fused_head=True)
    assert not trainer._saei_fused_head
    assert "saei_fused_head: using TRL's head instead, since the model soft-caps" in caplog.text


def test_fused_head_defaults_on_for_cpu_training(processor, examples, tmp_path):
    model = demo_model(processor, hidden_size=32, seed=0)
    assert trainer_for(model, processor, examples, tmp_path)._saei_fused_head
    assert not trainer_for(
        model, processor, examples, tmp_path, saei_fused_head=False
    )._saei_fused_head
    with pytest.raises(TypeError, match="saei_fused_head must be a bool or None, got str"):
        make_config(tmp_path, saei_fused_head="yes")


def test_saei_step_with_a_bfloat16_model_and_a_float32_head(processor, examples, tmp_path):
    model = demo_model(processor, hidden_size=32, seed=0).to(torch.bfloat16)
    trainer = trainer_for(
        model,
        processor,
        examples,
        tmp_path,
        max_steps=1,
        cast_lm_head_to_fp32=True,
        generation_kwargs={"suppress_tokens": no_stop_tokens(model, processor)},
    )
    assert trainer.model.lm_head.weight.dtype == torch.float32
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "reward" in e]
    assert entry["saei/selected_tokens"] >= 1 and entry["saei/entropy_after"] > 0


def test_saei_trains_a_lora_policy(processor, examples, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    attacked = []
    original = integration.entropy_attack

    def recording(model, *args, **kwargs):
        attacked.append(type(model).__name__)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(integration, "entropy_attack", recording)
    model = demo_model(processor, hidden_size=32, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(
            tmp_path,
            generation_kwargs={"suppress_tokens": no_stop_tokens(model, processor)},
            per_device_train_batch_size=2 * GROUP,
        ),
        train_dataset=to_dataset(examples),
        processing_class=processor,
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert isinstance(trainer.model, peft.PeftModel)
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert attacked == ["PeftModel", "PeftModel"]
    logs = [e for e in trainer.state.log_history if "reward" in e]
    assert all(e["saei/selected_tokens"] >= 1 for e in logs)
    after = dict(trainer.model.named_parameters())
    # The adapters trained (lora_B starts at 0, so lora_B moves first) ...
    assert any(not torch.equal(after[n], v) for n, v in adapters.items())
    # ... and the base weights did not.
    base = dict(trainer.model.get_base_model().named_parameters())
    for name, value in frozen.items():
        parent, leaf = name.rsplit(".", 1)
        key = name if name in base else f"{parent}.base_layer.{leaf}"
        assert torch.equal(base[key], value), name
