"""The demo's default model: a tiny Qwen2.5-VL and its processor, all built in code.

The model is :func:`saei_fast.tools.testing.tiny_qwen2_5_vl` (random weights, the real
architecture). The processor is the real ``Qwen2_5_VLProcessor`` around the real Qwen2-VL PIL
image processor and a word-level tokenizer made for the task's vocabulary, with a Qwen-style
chat template; special tokens take the ids the tiny model reserves for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from saei_fast.tools.testing import special_token_ids, tiny_qwen2_5_vl, tiny_qwen_image_processor

# Names of the tokens saei_fast.tools.testing reserves at the top of the vocabulary.
_RESERVED = {
    "pad": "<|endoftext|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}
_CHAT = ("<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant")

# Qwen's template with spaces for newlines (the tokenizer splits on whitespace): one
# vision block per image part, text parts verbatim, the assistant turn opened on request.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


class ImageQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor: the Qwen video processor needs
    torchvision, and the demo has no videos. Images go through the parent's code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent's token lookup, without its video processor argument.
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (split on whitespace and punctuation) plus the
    chat and vision special tokens; ``len(tokenizer)`` is the model's vocabulary size."""
    ordinary = [*_CHAT, *dict.fromkeys(words)]
    vocab_size = len(ordinary) + len(_RESERVED)
    vocab = {token: index for index, token in enumerate(ordinary)}
    ids = special_token_ids(vocab_size)
    vocab.update({token: ids[name] for name, token in _RESERVED.items()})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    specials = [*_CHAT[:3], *_RESERVED.values()]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=_RESERVED["pad"],
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": _RESERVED["image"],
            "video_token": _RESERVED["video"],
            "vision_start_token": _RESERVED["vision_start"],
            "vision_end_token": _RESERVED["vision_end"],
        },
    )


def demo_processor(words: Sequence[str], *, image_side: int = 56) -> ImageQwen2_5_VLProcessor:
    """The real Qwen2.5-VL processor for images of at most ``image_side`` pixels a side and a
    tokenizer over ``words``."""
    return ImageQwen2_5_VLProcessor(
        image_processor=tiny_qwen_image_processor(max_side=image_side),
        tokenizer=word_tokenizer(words),
        chat_template=CHAT_TEMPLATE,
    )


def demo_model(
    processor: ImageQwen2_5_VLProcessor,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 1,
    seed: int = 0,
) -> torch.nn.Module:
    """A tiny Qwen2.5-VL (float32, random weights from ``seed``) for ``processor``'s
    vocabulary, that stops generating at ``<|im_end|>``.

    One full-attention vision block is enough for colours and halves the vision tower's
    cost, which dominates a CPU step (it loops over images in Python)."""
    tokenizer = processor.tokenizer
    model = tiny_qwen2_5_vl(
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=len(tokenizer),
        vision_hidden_size=hidden_size,
        vision_depth=vision_depth,
        seed=seed,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def vision_token_ids(model: torch.nn.Module) -> list[int]:
    """Ids a policy must never sample: placeholders whose count must match the images."""
    config = model.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, name) for name in names if getattr(config, name, None) is not None]


def prompt_text(processor: ProcessorMixin, question: str) -> str:
    """The chat prompt TRL builds for one image and ``question`` (image first, as TRL's
    ``prepare_multimodal_messages`` puts it), with the assistant turn opened."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def load_local_processor(path: str) -> ProcessorMixin:
    """The multimodal processor of a local Hugging Face VLM folder (no download).

    Qwen2-VL / Qwen2.5-VL processors fall back to :class:`ImageQwen2_5_VLProcessor` where
    the full processor cannot be built (its video processor needs torchvision).

    Raises:
        ValueError: the folder holds no image-text model or no multimodal processor.
        OSError: the folder cannot be read as a model folder.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:
        processor = None
    if isinstance(processor, ProcessorMixin):
        return processor
    if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(
            f"{path} must hold a multimodal processor (processor_config.json) for its "
            f"{config.model_type} model; AutoProcessor gave {type(processor).__name__}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ImageQwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def load_local_model(path: str, *, dtype: torch.dtype) -> torch.nn.Module:
    """The image-text model of a local Hugging Face folder (no download)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
