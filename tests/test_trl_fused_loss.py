"""``SaEIConfig(saei_fused_loss=True)``: TRL's GRPO-family training loss with its gradient
taken by ``linear_token_loss`` in the forward, against TRL's own ``_compute_loss`` with
TRL's head (loss value, every parameter gradient, the logged metrics)."""

from __future__ import annotations

import copy

import pytest
import torch
from trl_helpers import Rewards, make_config

import saei_fast.integrations.shared.fused_loss as fused_loss
from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset
from saei_fast.tools.testing import vlm_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def trainer_for(model, processor, examples, tmp_path, beta=0.0, vllm_is=False, **overrides):
    trainer = SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards(),
        args=make_config(tmp_path, **overrides),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )
    # Set by the training loop; two micro-batches per step, so the scaling is checked too.
    trainer.current_gradient_accumulation_steps = 2
    # A KL term without a reference model (TRL would load one by name): the loss reads only
    # beta and the inputs' reference log-probs.
    trainer.beta = beta
    # vLLM's importance-sampling correction without a vLLM server: the loss reads these two
    # flags and the inputs' per-token ratios only.
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = vllm_is
    trainer.model.train()  # the training loss: TRL's "train" metrics and accumulation scaling
    return trainer


def loss_inputs(model, processor, examples, *, old=False, ref=False, seed=0, vllm_is=False):
    """What TRL's ``_compute_loss`` receives for 4 completions of 2 images."""
    batch = vlm_batch(
        model,
        processor.image_processor,
        [e.image for e in examples],
        group_size=2,
        seed=seed,
        completion_lengths=(2, 4),
    )
    ids, attention = batch.inputs["input_ids"], batch.inputs["attention_mask"] * 1
    width = ids.shape[1] - int(batch.completion_mask.any(0).nonzero().min())
    rows = ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "prompt_ids": ids[:, :-width],
        "prompt_mask": attention[:, :-width],
        "completion_ids": ids[:, -width:],
        "completion_mask": attention[:, -width:],
        "advantages": torch.randn(rows, generator=gen),
        "pixel_values": batch.inputs["pixel_values"],
        "image_grid_thw": batch.inputs["image_grid_thw"],
        "num_images": [1] * rows,
        "mm_token_type_ids": batch.inputs["mm_token_type_ids"],
    }
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum() * 3.0
    # Log-probs of a vocabulary of ~40 words are about -3.7; near them the clipping and
    # the KL both matter, and some ratios fall outside [1 - eps, 1 + eps].
    if old:
        inputs["old_per_token_logps"] = -3.7 + 0.3 * torch.randn(rows, width, generator=gen)
    if ref:
        inputs["ref_per_token_logps"] = -3.7 + 0.5 * torch.randn(rows, width, generator=gen)
    if vllm_is:
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(rows, width, generator=gen)
    return inputs


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def count_fused_calls(monkeypatch) -> list:
    calls, original = [], fused_loss.linear_token_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_loss, "linear_token_loss", counting)
    return calls


@pytest.mark.parametrize(
    ("settings", "old", "ref"),
    [
        ({}, False, False),  # one iteration: old log-probs are the current ones, detached
        ({"loss_type": "bnpo", "beta": 0.04}, True, True),
        ({"loss_type": "dr_grpo", "epsilon_high": 0.28, "delta": 1.5}, True, False),
        ({"loss_type": "dapo", "entropy_coef": 0.01, "temperature": 0.7}, True, False),
        ({"beta": 0.04, "use_bias_correction_kl": True, "entropy_coef": 0.02}, True, True),
        ({"vllm_is": True, "beta": 0.04}, True, True),
    ],
    ids=[
        "grpo",
        "bnpo-kl",
        "dr_grpo-two-sided",
        "dapo-entropy-bonus",
        "grpo-kl-corrected",
        "grpo-vllm-importance-sampling",
    ],
)
def test_fused_loss_equals_trls_loss(
    processor, examples, tmp_path, monkeypatch, settings, old, ref
):
    base = demo_model(processor, hidden_size=32, seed=0)
    calls = count_fused_calls(monkeypatch)
    ours = trainer_for(
        copy.deepcopy(base), processor, examples, tmp_path, saei_fused_loss=True, **settings
    )
    theirs = trainer_for(
        copy.deepcopy(base), processor, examples, tmp_path, saei_fused_head=False, **settings
    )
    inputs = loss_inputs(
        base, processor, examples, old=old, ref=ref, vllm_is=settings.get("vllm_is", False)
    )
    loss, grads, metrics = loss_and_grads(ours, inputs)
    assert len(calls) == 1  # the fused loss took the gradient ...
    want_loss, want_grads, want_metrics = loss_and_grads(theirs, inputs)
    assert len(calls) == 1  # ... and not for TRL's own trainer
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        scale = float(want_grads[name].abs().max())
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
    # TRL's code logged its metrics from the same log-probs and entropies.
    assert metrics.keys() == want_metrics.keys()
    for name, value in metrics.items():
        assert value == pytest.approx(want_metrics[name], rel=1e-5, abs=1e-7), name
    if old:
        assert metrics["clip_ratio/region_mean"] > 0  # the clipping was exercised


def test_a_loss_the_fused_terms_do_not_reproduce_raises(processor, examples, tmp_path, monkeypatch):
    """The value check: a per-token formula that drifts from TRL's never trains silently."""
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = trainer_for(model, processor, examples, tmp_path, saei_fused_loss=True)
    original = fused_loss.GRPOTokenLoss.token_loss
    monkeypatch.setattr(
        fused_loss.GRPOTokenLoss, "token_loss", lambda self, *a: 1.01 * original(self, *a)
    )
    with pytest.raises(RuntimeError, match="differs from TRL's"):
        trainer._compute_loss(model, loss_inputs(model, processor, examples))


def test_evaluation_without_grad_uses_trls_path(processor, examples, tmp_path, monkeypatch):
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = trainer_for(model, processor, examples, tmp_path, saei_fused_loss=True)
    calls = count_fused_calls(monkeypatch)
    with torch.no_grad():
        loss = trainer._compute_loss(model, loss_inputs(model, processor, examples))
    assert not calls and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"loss_type": "sapo"}, "loss_type='sapo'"),
        ({"importance_sampling_level": "sequence"}, "couples the tokens of a sequence"),
        ({"top_entropy_quantile": 0.5}, "quantile over the batch"),
        ({"use_adaptive_entropy": True, "entropy_coef": 0.01}, "use_adaptive_entropy"),
    ],
)
def test_unsupported_settings_are_refused_at_construction(
    processor, examples, tmp_path, settings, reason
):
    model = demo_model(processor, hidden_size=32, seed=0)
    with pytest.raises(ValueError, match=f"saei_fused_loss=True is not supported here: .*{reason}"):
        trainer_for(model, processor, examples, tmp_path, saei_fused_loss=True, **settings)


def test_setting_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="saei_fused_loss must be a bool"):
        make_config(tmp_path, saei_fused_loss="yes")


def test_training_with_saei_and_the_fused_loss(processor, examples, tmp_path, monkeypatch):
    """One real step of SaEI GRPO (clean + adversarial rows) with the fused loss: the
    training loop's own accumulation settings pass the value check."""
    model = demo_model(processor, hidden_size=32, seed=0)
    calls = count_fused_calls(monkeypatch)
    trainer = trainer_for(
        model, processor, examples, tmp_path, saei_fused_loss=True, max_steps=1,
        gradient_accumulation_steps=2, per_device_train_batch_size=4,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(calls) == 2  # one per micro-batch
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
