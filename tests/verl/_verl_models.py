"""Tiny Qwen-VL models under verl's own monkey patch, and the inputs verl's engine gives them.

- :func:`verl_patched`: verl's real ``apply_monkey_patch`` on a model, undone on exit. The
  patch replaces class attributes of transformers' Qwen-VL modules (every instance in the
  process), so the tests compare with the unpatched model before or after the block.
- :func:`verl_position_ids`: the position ids verl's agent loop computes for training rows
  (``AgentLoopWorker._compute_position_ids``, verl's own function), stacked as the engine
  stacks them. verl binds the model's ``get_rope_index`` to its processor when it loads one
  from a checkpoint (``verl.utils.tokenizer.hf_processor``); :func:`rope_processor` makes the
  same binding for a model built in code.
- :func:`varlen_attention` / :func:`dense_attention`: float64 stand-ins for flash-attn's
  ``flash_attn_varlen_func`` (several packed sequences) and transformers' flash-attn call
  (one), GPU-only kernels, so verl's patched Qwen2/2.5-VL attention (``qwen2_vl_attn_forward``,
  used with ``use_remove_padding``) runs on the CPU; everything around them is verl's code.
- :func:`peak_cpu_bytes`: the peak memory of a call on the CPU, for the attack-memory test
  and its benchmark (``bench/measure_verl_attack_memory.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import types
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

_PATCHED_MODULES = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
)
_PATCHED_ATTRIBUTES = ("forward", "fast_pos_embed_interpolate")


@contextlib.contextmanager
def verl_patched(model, *, use_remove_padding: bool) -> Iterator[None]:
    """verl's ``apply_monkey_patch(model, use_remove_padding=...)`` inside, undone after."""
    from transformers.integrations import flash_attention
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    saved = []
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == name:
                for attribute in _PATCHED_ATTRIBUTES:
                    saved.append((cls, attribute, cls.__dict__.get(attribute)))
    saved_flash = flash_attention._flash_attention_forward
    try:
        apply_monkey_patch(model, use_remove_padding=use_remove_padding)
        yield
    finally:
        for cls, attribute, value in saved:
            if value is None:
                if attribute in cls.__dict__:
                    delattr(cls, attribute)
            else:
                setattr(cls, attribute, value)
        flash_attention._flash_attention_forward = saved_flash


def rope_processor(model) -> types.SimpleNamespace:
    """What verl's agent loop reads of its processor for position ids: the model's
    ``get_rope_index`` (and ``get_vision_position_ids``) bound to it, its config, its
    image and video token ids (as ``hf_processor`` binds them)."""
    processor = types.SimpleNamespace(
        config=model.config,
        image_token_id=model.config.image_token_id,
        video_token_id=model.config.video_token_id,
    )
    model_class = type(model.model)
    processor.get_rope_index = types.MethodType(model_class.get_rope_index, processor)
    if hasattr(model_class, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(
            model_class.get_vision_position_ids, processor
        )
    return processor


def verl_position_ids(model, inputs: dict) -> torch.Tensor:
    """verl's position ids of every row of ``inputs`` (``[4, B, L]``)."""
    owner = types.SimpleNamespace(processor=rope_processor(model))
    fields = {"image_grid_thw": inputs["image_grid_thw"], "mm_token_type_ids": True}
    rows = []
    image_token = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    first = 0
    rows_in = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    for input_ids, attention_mask in rows_in:
        # the row's own images: as many grid rows as its image tokens need
        tokens, grids = int((input_ids == image_token).sum()), []
        while tokens > 0:
            grid = inputs["image_grid_thw"][first]
            grids.append(grid)
            tokens -= int(grid.prod()) // merge**2
            first += 1
        fields["image_grid_thw"] = torch.stack(grids)
        rows.append(
            AgentLoopWorker._compute_position_ids(
                owner, input_ids[None], attention_mask[None], dict(fields)
            )[0]
        )
    return torch.stack(rows).transpose(0, 1)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=True, **kwargs,
):  # fmt: skip
    """flash-attn's ``flash_attn_varlen_func`` contract (``[nnz, heads, dim]`` packed
    sequences delimited by ``cu_seqlens``), computed per sequence with PyTorch's sdpa."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and dropout_p == 0.0
    outputs = []
    bounds = cu_seqlens_q.tolist()
    for start, stop in itertools.pairwise(bounds):
        q_i, k_i, v_i = (t[start:stop].transpose(0, 1) for t in (q, k, v))
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q_i, k_i, v_i, is_causal=causal, scale=softmax_scale
            ).transpose(0, 1)
        )
    return torch.cat(outputs)


def dense_attention(q, k, v, attention_mask, query_length, is_causal=True, **kwargs):
    """transformers' ``_flash_attention_forward`` contract for one unpadded sequence per row
    (``[B, L, heads, dim]``, no mask), which verl's attention calls when the packed row holds
    a single sequence; computed with PyTorch's sdpa."""
    assert attention_mask is None and kwargs.get("dropout", 0.0) == 0.0
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal
    )
    return out.transpose(1, 2)


@contextlib.contextmanager
def cpu_varlen_kernel(monkeypatch) -> Iterator[list]:
    """verl's Qwen2-VL attention module with :func:`varlen_attention` in flash-attn's place
    (its module-level names are only bound where flash-attn is installed); yields the list
    of the ``cu_seqlens`` of every call."""
    from verl.models.transformers import qwen2_vl

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["cu_seqlens_q"].tolist())
        return varlen_attention(*args, **kwargs)

    monkeypatch.setattr(qwen2_vl, "flash_attn_varlen_func", counted, raising=False)
    monkeypatch.setattr(qwen2_vl, "_flash_attention_forward", dense_attention)
    monkeypatch.setattr(qwen2_vl, "_flash_supports_window_size", False, raising=False)
    monkeypatch.setattr(qwen2_vl, "_flash_supports_deterministic", False, raising=False)
    monkeypatch.setattr(qwen2_vl, "_flash_use_top_left_mask", False, raising=False)
    yield calls


def peak_cpu_bytes(function) -> int:
    """The highest total of bytes held by PyTorch's CPU allocator between operators while
    ``function()`` runs, from ``torch.profiler``'s per-operator memory records (allocations
    inside one operator that it frees again are not seen)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak
