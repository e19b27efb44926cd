"""Tiny random-weight VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA, Idefics3) and their PIL
image processors, built in code from seeded random weights (no downloads).

Special tokens take the top ids of the vocabulary (:func:`special_token_ids`).
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

# Special token ids count down from the top of the vocabulary.
SPECIAL_TOKENS = ("pad", "image", "video", "vision_start", "vision_end")


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Ids of the special tokens of a tiny model with ``vocab_size`` tokens."""
    return {name: vocab_size - 1 - index for index, name in enumerate(SPECIAL_TOKENS)}


def _seeded(builder, seed: int):
    # Random init draws from the global generator: fork it so a seed gives one model and
    # building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def _qwen_text_config(
    ids: dict[str, int],
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    mrope_section: list[int],
) -> dict:
    """The ``text_config`` the tiny Qwen-VLs share: half as many key/value heads as query
    heads, default multimodal RoPE over ``mrope_section``, the pad token as end token."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section,
        },
        "bos_token_id": None,
        "eos_token_id": ids["pad"],
        "pad_token_id": ids["pad"],
    }


def _qwen_vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The Qwen-VL config's image, video and vision start / end token ids."""
    return {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
    }


def tiny_qwen2_vl(
    *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Qwen2VLForConditionalGeneration:
    """A Qwen2-VL with random weights (text hidden 32 in 2 layers, vision 32 in 2 blocks),
    eval mode, with the image processor of :func:`tiny_qwen_image_processor`."""
    vocab_size, hidden = 128, 32
    ids = special_token_ids(vocab_size)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config=_qwen_text_config(
            ids,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_layers=2,
            num_heads=4,
            mrope_section=[1, 1, 2],
        ),
        **_qwen_vision_token_ids(ids),
    )
    config._attn_implementation = "sdpa"
    model = _seeded(lambda: Qwen2VLForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def tiny_qwen2_5_vl(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_num_heads: int | None = None,
    patch_size: int = 14,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL with random weights; shapes of the real one, sizes of a toy (eval mode).

    The vision tower has one windowed and one full-attention block (both code paths) with
    a 2x2 patch merger, as in the released models. Defaults: ``hidden_size // 8`` text
    heads, ``vision_hidden_size // 16`` vision heads, MLPs twice as wide as the model.
    """
    ids = special_token_ids(vocab_size)
    num_heads = num_heads or max(1, hidden_size // 8)
    half = hidden_size // num_heads // 2
    # Multimodal RoPE splits half the head dim over (time, height, width), in the released
    # models' proportions (16, 24, 24 of 64).
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": vision_num_heads or max(1, vision_hidden_size // 16),
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "window_size": 4 * patch_size,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        text_config=_qwen_text_config(
            ids,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mrope_section=[temporal, height, half - temporal - height],
        ),
        **_qwen_vision_token_ids(ids),
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def tiny_qwen3_vl(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Qwen3VLForConditionalGeneration:
    """A Qwen3-VL with random weights (16-pixel patches, DeepStack features from the first
    vision block, interleaved multimodal RoPE), eval mode. Its image processor is
    ``tiny_qwen_image_processor(patch_size=16)`` with mean = std = 0.5, as released."""
    ids = special_token_ids(vocab_size)
    num_heads = max(1, hidden_size // 8)
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    text_config = _qwen_text_config(
        ids,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mrope_section=[temporal, height, half - temporal - height],
    )
    text_config["head_dim"] = head_dim
    text_config["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": max(1, vision_hidden_size // 16),
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        text_config=text_config,
        **_qwen_vision_token_ids(ids),
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: Qwen3VLForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def tiny_qwen_image_processor(
    *, max_side: int = 56, patch_size: int = 14
) -> Qwen2VLImageProcessorPil:
    """The real Qwen2-VL PIL image processor (used by Qwen2/2.5/3-VL), limited to images of
    at most ``max_side x max_side`` pixels (sides are multiples of ``2 * patch_size``).
    ``patch_size=16`` gives Qwen3-VL's: 16-pixel patches, mean = std = 0.5."""
    factor = 2 * patch_size
    qwen3 = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if patch_size == 16 else {}
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": factor * factor, "longest_edge": max_side * max_side},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        **qwen3,
    )


def tiny_llava(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A LLaVA (CLIP vision tower + Llama) with random weights (eval mode)."""
    ids = special_token_ids(vocab_size)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=max(1, hidden_size // 16),
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=max(1, hidden_size // 8),
            num_key_value_heads=max(1, hidden_size // 16),
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=ids["pad"],
            pad_token_id=ids["pad"],
        ),
        image_token_index=ids["image"],
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: LlavaForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def tiny_llava_image_processor(*, image_size: int = 28) -> LlavaImageProcessorPil:
    """The real LLaVA PIL image processor (CLIP mean/std) at ``image_size`` pixels."""
    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def tiny_idefics3(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Idefics3ForConditionalGeneration:
    """An Idefics3 (SmolVLM's architecture: SigLIP-style tower, pixel shuffle, Llama) with
    random weights (eval mode); its batches are ``[B, N, C, H, W]`` with padded slots."""
    ids = special_token_ids(vocab_size)
    config = Idefics3Config(
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": max(1, hidden_size // 16),
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": max(1, hidden_size // 8),
            "num_key_value_heads": max(1, hidden_size // 16),
            "bos_token_id": None,
            "eos_token_id": ids["pad"],
            "pad_token_id": ids["pad"],
        },
        image_token_id=ids["image"],
        scale_factor=2,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: Idefics3ForConditionalGeneration(config), seed)
    return model.to(dtype).eval()


def tiny_idefics3_image_processor(*, image_size: int = 28) -> Idefics3ImageProcessorPil:
    """The real Idefics3 PIL image processor without splitting, at ``image_size`` pixels."""
    return Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
