"""SaEIGRPOTrainer: real TRL training steps on a tiny Qwen2.5-VL, with a record of what the
model was given, plus the configuration checks.

The layout checks (rows 0..n_clean-1 of every group generated from the clean image, the
rest from the adversarial one; loss inputs clean; advantages over the whole group) compare
what ``model.generate`` and the loss forward actually received against pixel values the
processor computes independently from the dataset's images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trl
from packaging.version import Version
from trl import GRPOConfig
from trl_helpers import (
    ALPHA,
    GROUP,
    N_ADV,
    N_CLEAN,
    TRAINER_MARKS,
    FakeVLLMServer,
    ModelRecorder,
    Rewards,
    capture_scored_batches,
    image_blocks,
    index_of,
    make_config,
    make_trainer,
)

import saei_fast
from saei_fast.integrations.trl import (
    SUPPORTED_TRL,
    SaEIGRPOTrainer,
    check_whole_groups_per_process,
)
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS


# ---- a real SaEI training run, recorded ------------------------------------------------------


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def saei_run(processor, examples, tmp_path_factory, monkeypatch_module):
    model = demo_model(processor, hidden_size=32, seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = ModelRecorder(model)
    rewards = Rewards()
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path_factory.mktemp("saei"),
        reward_funcs=rewards,
    )
    scored = capture_scored_batches(trainer)
    attacks = record_attacks(monkeypatch_module)
    losses = record_loss_entropies(trainer)
    trainer.train()
    clean = processor.image_processor([e.image for e in examples], return_tensors="pt")
    return {
        "trainer": trainer,
        "attacks": attacks,
        "losses": losses,
        "recorder": recorder,
        "rewards": rewards,
        "scored": scored,
        "initial": initial,
        "clean_blocks": image_blocks(clean["pixel_values"]),
        "grid": clean["image_grid_thw"][:1],
    }


def test_generation_clean_rows_from_clean_image_then_adversarial(saei_run, processor):
    calls = saei_run["recorder"].generate_calls
    clean_blocks = saei_run["clean_blocks"]
    assert len(calls) == 4  # two steps, each: clean rows, then adversarial rows
    space = saei_fast.pixels.from_processor(processor)
    for clean_call, adv_call in (calls[0:2], calls[2:4]):
        assert len(clean_call["input_ids"]) == 2 * N_CLEAN
        assert len(adv_call["input_ids"]) == 2 * N_ADV
        # Clean call: each group's rows carry exactly the processor's pixels of one image.
        owners = [index_of(b, clean_blocks) for b in image_blocks(clean_call["pixel_values"])]
        assert owners[:N_CLEAN] == [owners[0]] * N_CLEAN
        assert owners[N_CLEAN:] == [1 - owners[0]] * N_CLEAN
        # Adversarial call: one image per group, alpha away from that group's clean image.
        adv_blocks = image_blocks(adv_call["pixel_values"])
        for group in range(2):
            rows = adv_blocks[group * N_ADV : (group + 1) * N_ADV]
            assert all(torch.equal(rows[0], row) for row in rows)
            grid = saei_run["grid"]
            (adv,) = space.to_images(rows[0], image_grid_thw=grid)
            (clean,) = space.to_images(clean_blocks[owners[group * N_CLEAN]], image_grid_thw=grid)
            change = (adv - clean).abs()
            assert change.max() <= ALPHA + 1e-5
            assert (change > ALPHA / 2).float().mean() > 0.5  # most pixels took the step
        # The prompts are the same in both calls (same question, same expanded image tokens).
        assert torch.equal(clean_call["input_ids"][:1], adv_call["input_ids"][:1])


def test_rows_are_clean_then_adversarial_within_each_group(saei_run):
    calls = saei_run["recorder"].generate_calls
    for step, batch in enumerate(saei_run["scored"]):
        clean, adv = calls[2 * step]["completions"], calls[2 * step + 1]["completions"]
        rows = batch["completion_ids"]
        for group in range(2):
            first = group * GROUP
            for j in range(N_CLEAN):
                assert torch.equal(rows[first + j], clean[group * N_CLEAN + j])
            for j in range(N_ADV):
                assert torch.equal(rows[first + N_CLEAN + j], adv[group * N_ADV + j])


def test_loss_inputs_use_the_clean_image_for_every_row(saei_run):
    clean_blocks = saei_run["clean_blocks"]
    for batch in saei_run["scored"]:
        owners = [index_of(b, clean_blocks) for b in image_blocks(batch["pixel_values"])]
        # Every row of a group (clean and adversarial) carries its group's clean image.
        assert owners == [owners[0]] * GROUP + [1 - owners[0]] * GROUP
    # What the loss forwards actually received: clean images only, each row once per step.
    loss_pixels = saei_run["recorder"].loss_pixels
    assert len(loss_pixels) == 2
    for pixels in loss_pixels:
        owners = sorted(index_of(b, clean_blocks) for b in image_blocks(pixels))
        assert owners == [0] * GROUP + [1] * GROUP


def test_advantages_are_normalized_over_the_whole_group(saei_run):
    for batch, rewards in zip(saei_run["scored"], saei_run["rewards"].calls, strict=True):
        rewards = torch.tensor(rewards)
        # TRL's group normalization adds 1e-4 to the std.
        expected = saei_fast.group_advantages(rewards, GROUP, eps=1e-4)
        torch.testing.assert_close(batch["advantages"], expected, rtol=1e-5, atol=1e-6)


def test_training_logs_saei_metrics_and_updates_the_model(saei_run):
    trainer = saei_run["trainer"]
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logs) == 2
    for entry, rewards in zip(logs, saei_run["rewards"].calls, strict=True):
        for key in ("saei/entropy_before", "saei/entropy_after", "saei/attack_seconds"):
            assert math.isfinite(entry[key])
        assert 0 < entry["saei/entropy_before"] <= math.log(len(trainer.processing_class.tokenizer))
        assert entry["saei/selected_tokens"] >= 1
        assert entry["entropy"] > 0  # mean policy entropy of the loss forward
        is_adv = torch.tensor([False] * N_CLEAN + [True] * N_ADV).repeat(2)
        rewards = torch.tensor(rewards)
        assert entry["saei/reward_clean"] == pytest.approx(rewards[~is_adv].mean().item())
        assert entry["saei/reward_adv"] == pytest.approx(rewards[is_adv].mean().item())
    changed = [
        not torch.equal(value, saei_run["initial"][key])
        for key, value in trainer.model.state_dict().items()
    ]
    assert any(changed)


def test_logged_attack_metrics_are_the_attacks_results(saei_run):
    """saei/* values against what entropy_attack returned and what the loss computed."""
    trainer = saei_run["trainer"]
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    calls = saei_run["recorder"].generate_calls
    assert len(saei_run["attacks"]) == len(logs) == 2
    for step, (entry, attack) in enumerate(zip(logs, saei_run["attacks"], strict=True)):
        result = attack["result"]
        assert attack["config"].perturbation == "entropy" and attack["generator"] is None
        assert entry["saei/entropy_before"] == pytest.approx(result.entropy_before, rel=1e-12)
        assert entry["saei/entropy_after"] == pytest.approx(result.entropy_after, rel=1e-12)
        assert result.entropy_after != pytest.approx(result.entropy_before, rel=1e-6)
        gain = entry["saei/entropy_after"] - entry["saei/entropy_before"]
        assert entry["saei/entropy_gain"] == pytest.approx(gain, rel=1e-9)
        assert entry["saei/selected_tokens"] == result.num_selected
        relative = (result.group_entropy_after / result.group_entropy_before - 1).tolist()
        assert len(relative) == 2  # two groups, one median of two
        assert entry["saei/entropy_gain_relative"] == pytest.approx(sum(relative) / 2, rel=1e-6)
        negative = sum(value < 0 for value in relative) / 2
        assert entry["saei/gain_negative_fraction"] == pytest.approx(negative)

        # Distinct completions per group, from what generate returned.
        clean, adv = calls[2 * step]["completions"], calls[2 * step + 1]["completions"]
        for name, rows, n in (("clean", clean, N_CLEAN), ("adv", adv, N_ADV)):
            distinct = [len({tuple(r.tolist()) for r in rows[g * n : (g + 1) * n]}) for g in (0, 1)]
            assert entry[f"saei/distinct_{name}"] == pytest.approx(sum(distinct) / 2)

        # The loss forward's entropy, split by row kind; TRL's value is their token mean.
        loss = saei_run["losses"][step]
        adversarial = loss["inputs"]["saei_is_adversarial"][:, None]
        mask = loss["inputs"]["completion_mask"].bool()
        entropies = loss["entropies"].double()
        for name, rows in (("clean", mask & ~adversarial), ("adv", mask & adversarial)):
            expected = float((entropies * rows).sum() / rows.sum())
            assert entry[f"saei/entropy_{name}_rows"] == pytest.approx(expected, rel=1e-6)
        assert entry["entropy"] == pytest.approx(float(entropies[mask].mean()), rel=1e-6)
        clean_rows, adv_rows = entry["saei/entropy_clean_rows"], entry["saei/entropy_adv_rows"]
        assert clean_rows != pytest.approx(adv_rows, rel=1e-6)


def record_attacks(monkeypatch) -> list[dict]:
    """Every entropy_attack call the trainer makes: its config, generator and result."""
    import saei_fast.integrations.trl.sampling as integration

    calls, original = [], integration.entropy_attack

    def recording(*args, config, generator=None, **kwargs):
        result = original(*args, config=config, generator=generator, **kwargs)
        calls.append({"config": config, "generator": generator, "result": result})
        return result

    monkeypatch.setattr(integration, "entropy_attack", recording)
    return calls


def record_loss_entropies(trainer) -> list[dict]:
    """The inputs of every loss forward and the entropies it computed (per micro-batch)."""
    records = []
    compute_loss, per_token = trainer.compute_loss, trainer._get_per_token_logps_and_entropies

    def loss(model, inputs, *args, **kwargs):
        records.append({"inputs": {k: v for k, v in inputs.items() if torch.is_tensor(v)}})
        return compute_loss(model, inputs, *args, **kwargs)

    def logps(*args, **kwargs):
        output = per_token(*args, **kwargs)
        if kwargs.get("compute_entropy"):
            records[-1]["entropies"] = output[1].detach().clone()
        return output

    trainer.compute_loss, trainer._get_per_token_logps_and_entropies = loss, logps
    return records


def test_vanilla_switch_generates_every_row_from_the_clean_image(processor, examples, tmp_path):
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        full_length=False,
        saei_enabled=False,
        max_steps=1,
    )
    trainer.train()
    (call,) = recorder.generate_calls
    clean = processor.image_processor([e.image for e in examples], return_tensors="pt")
    clean_blocks = image_blocks(clean["pixel_values"])
    owners = [index_of(b, clean_blocks) for b in image_blocks(call["pixel_values"])]
    assert sorted(owners) == [0] * GROUP + [1] * GROUP
    assert not any(key.startswith("saei/") for key in trainer.state.log_history[0])


# ---- vLLM importance-sampling correction -----------------------------------------------------


def test_vllm_importance_sampling_keeps_adversarial_rows(processor, examples, tmp_path):
    """TRL's sequence_mask correction would drop adversarial rows whose sampling image
    differs from the clean one; SaEI gives them ratio 1 and says so in its logs."""
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = make_trainer(
        model, processor, to_dataset(examples), tmp_path, full_length=False, saei_alpha=64 / 255
    )
    fake = FakeVLLMServer(model, processor, max_tokens=4)
    # The state TRL's __init__ sets for use_vllm=True, vllm_mode="server" (which needs vLLM).
    trainer.use_vllm, trainer.vllm_mode, trainer.vllm_generation = True, "server", fake
    trainer._last_loaded_step = trainer.state.global_step
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = "sequence_mask"
    # Tight bounds: the clean rows (same model, same image) stay inside them.
    trainer.vllm_importance_sampling_clip_min = 0.999
    trainer.vllm_importance_sampling_clip_max = 1.001
    trainer.model.train()
    dataset = trainer.train_dataset
    inputs = [dict(dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)

    # What the backend was given: runs of identical rows, clean then adversarial images.
    clean_call, adv_call = fake.calls
    assert clean_call["n"] == N_CLEAN and adv_call["n"] == N_ADV
    for call, n in ((clean_call, N_CLEAN), (adv_call, N_ADV)):
        assert len(call["images"]) == 2 * n
        for group in range(2):
            run = call["images"][group * n : (group + 1) * n]
            assert all(np.array_equal(np.asarray(run[0][0]), np.asarray(r[0])) for r in run)
    for group, example in enumerate(examples):
        clean = np.asarray(example.image, dtype=np.int16)
        sent_clean = np.asarray(clean_call["images"][group * N_CLEAN][0], dtype=np.int16)
        sent_adv = np.asarray(adv_call["images"][group * N_ADV][0], dtype=np.int16)
        assert np.array_equal(sent_clean, clean)
        assert 0 < np.abs(sent_adv - clean).max() <= 64 + 1

    # The ratio TRL computed from the backend's log-probs and the clean-image ones.
    completion_mask = output["completion_mask"].bool()
    old = output["old_per_token_logps"]
    clean_logps, adv_logps = (torch.tensor(call["logps"])[..., 0] for call in fake.calls)
    sampled = torch.cat(
        [
            torch.cat(
                [
                    clean_logps[g * N_CLEAN : (g + 1) * N_CLEAN],
                    adv_logps[g * N_ADV : (g + 1) * N_ADV],
                ]
            )
            for g in range(2)
        ]
    )
    trl_ratio = torch.exp(((old - sampled) * completion_mask).sum(-1, keepdim=True))
    trl_ratio = trl_ratio.masked_fill((trl_ratio < 0.999) | (trl_ratio > 1.001), 0.0)
    is_adv = torch.tensor([False] * N_CLEAN + [True] * N_ADV).repeat(2)

    ratio = output["importance_sampling_ratio"]
    assert torch.equal(ratio[is_adv], torch.ones_like(ratio[is_adv]))
    torch.testing.assert_close(ratio[~is_adv], trl_ratio[~is_adv])
    assert (ratio[~is_adv] > 0).all()  # clean rows: same image, ratio ~1, kept
    assert (trl_ratio[is_adv] == 0).any()  # what TRL alone would have done to them
    torch.testing.assert_close(output["sampling_per_token_logps"][is_adv], old[is_adv])
    torch.testing.assert_close(output["sampling_per_token_logps"][~is_adv], sampled[~is_adv])

    logged = trainer._metrics["train"]
    dropped = (trl_ratio[is_adv] == 0).float().mean().item()
    assert logged["saei/adv_is_dropped_fraction"][-1] == pytest.approx(dropped)
    shift = (sampled - old)[is_adv][completion_mask[is_adv]].mean().item()
    assert logged["saei/adv_sampling_logp_shift"][-1] == pytest.approx(shift, abs=1e-6)


# ---- configuration checks ---------------------------------------------------------------------


def test_group_split_defaults_and_errors(tmp_path):
    config = make_config(tmp_path, num_generations=8, saei_n_clean=None, saei_n_adv=None)
    assert (config.saei_n_clean, config.saei_n_adv) == (4, 4)
    config = make_config(tmp_path, num_generations=8, saei_n_clean=6, saei_n_adv=None)
    assert (config.saei_n_clean, config.saei_n_adv) == (6, 2)
    with pytest.raises(ValueError, match=r"saei_n_clean \+ saei_n_adv must equal num_generations"):
        make_config(tmp_path, num_generations=4, saei_n_clean=2, saei_n_adv=1)
    with pytest.raises(ValueError, match="saei_n_adv must be >= 1, got 0"):
        make_config(tmp_path, num_generations=4, saei_n_clean=4, saei_n_adv=None)
    with pytest.raises(ValueError, match="saei_n_clean must be >= 1, got 0"):
        make_config(tmp_path, saei_n_clean=0, saei_n_adv=4)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"saei_alpha": 0.0}, ValueError, "saei_alpha must be finite and > 0, got 0.0"),
        ({"saei_alpha": "2/255"}, TypeError, "saei_alpha must be a float, got str"),
        ({"saei_steps": 0}, ValueError, "saei_steps must be >= 1, got 0"),
        ({"saei_eps": -0.1}, ValueError, "saei_eps must be finite and > 0"),
        ({"saei_band": [0.6, 0.3]}, ValueError, "saei_band must satisfy 0 <= lo < hi <= 1"),
        ({"saei_band": [0.5]}, TypeError, "saei_band must be a pair"),
        ({"saei_scope": "token"}, ValueError, "saei_scope must be one of"),
        ({"saei_micro_batch_size": 0}, ValueError, "saei_micro_batch_size must be >= 1"),
        ({"saei_enabled": "yes"}, TypeError, "saei_enabled must be a bool, got str"),
        (
            {"use_transformers_continuous_batching": True},
            ValueError,
            "does not support use_transformers_continuous_batching",
        ),
    ],
)
def test_config_rejects_bad_saei_settings(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        make_config(tmp_path, **overrides)


def test_config_builds_the_attack_config(tmp_path):
    config = make_config(tmp_path, saei_band=[0.25, 0.75], saei_steps=2, saei_eps=4 / 255)
    attack = config.attack_config()
    assert attack.band == (0.25, 0.75) and attack.steps == 2 and attack.eps == 4 / 255
    assert attack.group_size == N_CLEAN and attack.alpha == ALPHA and attack.measure_after
    assert attack.temperature == config.temperature


def test_groups_must_not_be_split_across_processes():
    check_whole_groups_per_process(8, 1, 8)
    check_whole_groups_per_process(4, 2, 8)
    # With 2 processes, TRL accepts a global generation batch of 8 for groups of 8, but
    # each process would hold half a group.
    with pytest.raises(ValueError, match=r"4 rows must be a multiple of num_generations \(8\)"):
        check_whole_groups_per_process(4, 1, 8)


def test_trainer_rejects_what_saei_cannot_sample_with(processor, examples, tmp_path):
    model = demo_model(processor, hidden_size=32, seed=0)
    dataset = to_dataset(examples)
    plain = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match=r"args must be a saei_fast\.integrations\.trl\.SaEIConfig"):
        SaEIGRPOTrainer(model=model, reward_funcs=Rewards(), args=plain, train_dataset=dataset)
    config = make_config(tmp_path)
    with pytest.raises(ValueError, match="does not support rollout_func"):
        SaEIGRPOTrainer(
            model=model,
            reward_funcs=Rewards(),
            args=config,
            train_dataset=dataset,
            processing_class=processor,
            rollout_func=lambda prompts, trainer: {},
        )
    with pytest.raises(ValueError, match="needs a vision-language model and its processor"):
        SaEIGRPOTrainer(
            model=model,
            reward_funcs=Rewards(),
            args=config,
            train_dataset=dataset,
            processing_class=processor.tokenizer,
        )


def test_installed_trl_is_the_supported_and_pinned_one():
    assert SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [r for r in pyproject["project"]["optional-dependencies"]["trl"] if r.startswith("trl")]
    assert pins == [f"trl>={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}"]


# ---- per-row views of processor outputs -------------------------------------------------------


def test_split_and_merge_rows_of_per_image_and_per_token_fields():
    from saei_fast.integrations.shared.rows import merge_rows, model_batch, split_rows

    pixels = torch.arange(3 * 2).reshape(3, 2).float()  # one entry per image (plain layout)
    fields = {"pixel_values": pixels, "token_type_ids": [[0, 1], [1, 1, 0]]}
    rows = split_rows(fields, [["a"], ["b", "c"]], 2)  # row 1 owns two images
    assert torch.equal(rows[0]["pixel_values"], pixels[:1])
    assert torch.equal(rows[1]["pixel_values"], pixels[1:])
    assert rows[1]["token_type_ids"] == [1, 1, 0]
    merged = merge_rows([rows[1], rows[0]])
    assert torch.equal(merged["pixel_values"], pixels[[1, 2, 0]])
    assert merged["token_type_ids"] == [[1, 1, 0], [0, 1]]

    batch, completion = model_batch(
        [[5, 6], [7, 8, 9]], [[1], [2, 3]], rows, pad_token_id=0, device=torch.device("cpu")
    )
    assert batch["input_ids"].tolist() == [[0, 5, 6, 1, 0], [7, 8, 9, 2, 3]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert completion.int().tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]

    with pytest.raises(ValueError, match=r"multimodal field 'image_sizes' of shape \(5, 2\)"):
        split_rows({"image_sizes": torch.zeros(5, 2)}, [["a"], ["b", "c"]], 2)
