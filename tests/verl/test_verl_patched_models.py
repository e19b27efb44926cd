"""The attack on models that verl's real ``apply_monkey_patch`` has patched, against the same
models unpatched (float64, so "same pixels" is exact and gradients agree to rounding).

- The public ``saei_fast.entropy_attack`` on a model patched with
  ``use_remove_padding=False`` (verl's patched forward takes no ``pixel_values`` argument and
  computes no multimodal RoPE positions).
- The actor's attack (``saei_attack_on``) fed as verl's engine feeds the model: verl's own
  position ids, ``use_remove_padding`` off (padded rows) and on (rows packed into one).
  Qwen2/2.5-VL's patched attention calls flash-attn's kernels with packed rows (varlen for
  several sequences, the dense one for a single sequence), which exist only on GPUs: here
  float64 sdpa stand-ins take their place (``_verl_models``) and verl's attention code
  around them runs as is; the kernels themselves are exercised by
  ``bench/gpu_verl_check.sh``. The attack runs in micro-batches of 2 of a group's 3 rows, so
  positions and packing are cut per micro-batch. Qwen3-VL's patch keeps
  transformers' attention, which runs packed rows on the CPU with sdpa.
"""

import numpy as np
import pytest
import torch
from _verl_models import cpu_varlen_kernel, verl_patched, verl_position_ids
from verl import DataProto

from saei_fast import pixels
from saei_fast.attack import AttackConfig, entropy_attack, pixel_gradient
from saei_fast.integrations.verl.engine_model import check_engine
from saei_fast.integrations.verl.worker import saei_attack_on
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

GROUP = 3
MODELS = {
    "qwen2_vl": (tiny_qwen2_vl, 14),
    "qwen2_5_vl": (tiny_qwen2_5_vl, 14),
    "qwen3_vl": (tiny_qwen3_vl, 16),
}


def _setup(name, seed=0):
    build, patch = MODELS[name]
    model = build(dtype=torch.float64, seed=seed)
    processor = tiny_qwen_image_processor(patch_size=patch)
    batch = vlm_batch(
        model, processor, random_images(2, (56, 56), seed=seed + 1), group_size=GROUP, seed=seed
    )
    return model, pixels.from_processor(processor), batch


def _patched_forward(model) -> str:
    return type(model).forward.__module__


@pytest.mark.parametrize("name", sorted(MODELS))
def test_entropy_attack_gives_the_same_pixels_on_the_patched_model(name):
    model, space, batch = _setup(name)
    config = AttackConfig(group_size=GROUP, micro_batch_size=2, measure_after=True)
    clean = entropy_attack(model, batch.inputs, batch.completion_mask, space=space, config=config)
    clean_grad = pixel_gradient(
        model, batch.inputs, batch.completion_mask, space=space, config=config
    )
    with verl_patched(model, use_remove_padding=False):
        assert _patched_forward(model).startswith("verl.models.transformers")
        patched = entropy_attack(
            model, batch.inputs, batch.completion_mask, space=space, config=config
        )
        patched_grad = pixel_gradient(
            model, batch.inputs, batch.completion_mask, space=space, config=config
        )
    assert _patched_forward(model).startswith("transformers.models")
    torch.testing.assert_close(patched_grad.grad, clean_grad.grad, rtol=1e-10, atol=1e-16)
    assert torch.equal(patched.pixel_values, clean.pixel_values)
    assert patched.entropy_before == pytest.approx(clean.entropy_before, rel=1e-12)
    assert patched.entropy_after == pytest.approx(clean.entropy_after, rel=1e-12)
    assert float(clean_grad.grad.abs().sum()) > 0


def _groups(batch, position_ids):
    """The two groups of ``batch`` as the agent loop sends them (one copy of the image per
    row, verl's position ids, no ``mm_token_type_ids``: verl's engine does not pass it)."""
    rows_per_image = batch.inputs["pixel_values"].shape[0] // (2 * GROUP)
    groups = []
    for first in (0, GROUP):
        rows = slice(first, first + GROUP)
        pixel_rows = slice(first * rows_per_image, (first + GROUP) * rows_per_image)
        groups.append(
            {
                "input_ids": batch.inputs["input_ids"][rows],
                "attention_mask": batch.inputs["attention_mask"][rows],
                "pixel_values": batch.inputs["pixel_values"][pixel_rows],
                "image_grid_thw": batch.inputs["image_grid_thw"][rows],
                "position_ids": position_ids[:, rows],
                "completion_mask": batch.completion_mask[rows],
                "image_rows": rows_per_image,
            }
        )
    return groups


def _worker_attack(model, space, groups, *, remove_padding, mode="attack", micro_batch_size=None):
    column = np.empty(len(groups), dtype=object)
    column[:] = groups
    config = AttackConfig(micro_batch_size=micro_batch_size)
    data = DataProto.from_dict(
        non_tensors={"saei_group": column},
        meta_info={"saei_space": space, "saei_config": config, "saei_mode": mode},
    )
    return list(
        saei_attack_on(model, data, remove_padding=remove_padding).non_tensor_batch["saei_result"]
    )


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "remove_padding"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_actor_attack_in_the_engine_layout_matches_the_unpatched_model(
    name, remove_padding, monkeypatch
):
    model, space, batch = _setup(name, seed=2)
    # Ragged completions: packed rows then differ from padded ones in every offset.
    assert len(set(batch.completion_mask.sum(1).tolist())) > 1
    # The attack and the pixel gradient of each group on the unpatched model.
    expected, expected_grads = (
        [
            function(
                model,
                _rows(batch, first),
                batch.completion_mask[first : first + GROUP],
                space=space,
                config=AttackConfig(group_size=GROUP),
            )
            for first in (0, GROUP)
        ]
        for function in (entropy_attack, pixel_gradient)
    )
    groups = _groups(batch, verl_position_ids(model, batch.inputs))
    with (
        verl_patched(model, use_remove_padding=remove_padding),
        cpu_varlen_kernel(monkeypatch) as kernel_calls,
    ):
        # micro-batches of 2 of the 3 rows: positions and packing cut per micro-batch
        results = _worker_attack(
            model, space, groups, remove_padding=remove_padding, micro_batch_size=2
        )
        grads = _worker_attack(model, space, groups, remove_padding=remove_padding, mode="gradient")
    if remove_padding and name != "qwen3_vl":
        # verl's attention saw the micro-batch's rows packed, one sequence per row.
        lengths = groups[0]["attention_mask"][:2].sum(1).tolist()
        assert kernel_calls[0] == [0, *np.cumsum(lengths).tolist()]
    else:
        assert kernel_calls == []
    for result, grad, want, want_grad, group in zip(
        results, grads, expected, expected_grads, groups, strict=True
    ):
        rows = group["image_rows"]
        summed = want_grad.grad.reshape(GROUP, rows, -1).sum(0)
        torch.testing.assert_close(grad["grad"].reshape(rows, -1), summed, rtol=1e-9, atol=1e-15)
        assert torch.equal(result["pixel_values"], want.pixel_values[:rows])
        assert result["entropy_before"] == pytest.approx(want.entropy_before, rel=1e-12)


def test_packed_rows_without_position_ids_get_verls(monkeypatch):
    """A group batch as a caller outside the agent loop builds it (the processor's
    ``mm_token_type_ids``, no position ids): with ``use_remove_padding`` the rows get verl's
    position ids, so the result is the one with verl's own."""
    model, space, batch = _setup("qwen2_5_vl", seed=3)
    with_verl = _groups(batch, verl_position_ids(model, batch.inputs))
    without = [
        {
            **{key: value for key, value in group.items() if key != "position_ids"},
            "mm_token_type_ids": batch.inputs["mm_token_type_ids"][first : first + GROUP],
        }
        for group, first in zip(with_verl, (0, GROUP), strict=True)
    ]
    with verl_patched(model, use_remove_padding=True), cpu_varlen_kernel(monkeypatch):
        expected = _worker_attack(model, space, with_verl, remove_padding=True, mode="gradient")
        got = _worker_attack(model, space, without, remove_padding=True, mode="gradient")
    for result, want in zip(got, expected, strict=True):
        torch.testing.assert_close(result["grad"], want["grad"], rtol=1e-12, atol=1e-18)
        assert float(want["grad"].abs().sum()) > 0


def _rows(batch, first):
    """Rows ``first .. first + GROUP`` of ``batch`` as an HF batch (with the processor's
    ``mm_token_type_ids``, from which the unpatched model computes its own positions)."""
    rows = slice(first, first + GROUP)
    per_row = batch.inputs["pixel_values"].shape[0] // (2 * GROUP)
    return {
        "input_ids": batch.inputs["input_ids"][rows],
        "attention_mask": batch.inputs["attention_mask"][rows],
        "mm_token_type_ids": batch.inputs["mm_token_type_ids"][rows],
        "pixel_values": batch.inputs["pixel_values"][first * per_row : (first + GROUP) * per_row],
        "image_grid_thw": batch.inputs["image_grid_thw"][rows],
    }


def test_verl_position_ids_are_the_models_own():
    """verl's position ids (text row + mRoPE rows) carry the positions Hugging Face computes
    inside the unpatched model; without them the patched model sees 1D text positions."""
    model, _, batch = _setup("qwen2_5_vl")
    verl_ids = verl_position_ids(model, batch.inputs)
    hf_ids, _ = model.model.get_rope_index(
        batch.inputs["input_ids"],
        mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=batch.inputs["image_grid_thw"],
        attention_mask=batch.inputs["attention_mask"],
    )
    real = batch.inputs["attention_mask"].bool()
    assert verl_ids.shape == (4, *batch.inputs["input_ids"].shape)
    assert torch.equal(verl_ids[1:, real], hf_ids[:, real])
    assert not torch.equal(verl_ids[1:, real], verl_ids[:1, real].expand(3, -1))


class _Engine:
    def __init__(self, sp_size, remove_padding):
        self.ulysses_sequence_parallel_size = sp_size
        self.use_remove_padding = remove_padding


def test_ulysses_sequence_parallel_is_refused():
    assert check_engine(_Engine(1, True)) is True
    assert check_engine(_Engine(1, False)) is False
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size must be 1, got 2"):
        check_engine(_Engine(2, True))
