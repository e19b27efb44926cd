"""A Qwen2.5-VL-style tokenizer and processor built in code, for verl's agent-loop machinery.

verl's agent loop tokenizes through its Continuous Token builder for ``qwen2_5_vl``, which
renders the chat template with the processor, runs the processor on the text and images,
and needs ``<|im_end|>`` and a one-token ``"\\n"`` (Qwen's turn separator). The tokenizer
here is a ``tokenizers`` word-level model over a few words with Qwen's chat and vision
special tokens; the vision tokens take the ids :mod:`saei_fast.tools.testing` reserves, so the
tiny Qwen2.5-VL reads the prompts it builds. The processor is the real
``Qwen2_5_VLProcessor`` code without its video processor (which needs torchvision), with
the model's ``get_rope_index`` bound to it as verl's ``hf_processor`` does.
"""

from __future__ import annotations

import types

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_5_vl import Qwen2_5_VLModel

from saei_fast.tools.demo.model import ImageQwen2_5_VLProcessor
from saei_fast.tools.testing import special_token_ids, tiny_qwen2_5_vl, tiny_qwen_image_processor

WORDS = ("which", "colour", "covers", "most", "of", "the", "image", "?", "red", "green", "blue")
_CHAT = ("<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "system")
_VISION = {
    "pad": "<|endoftext|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}
# Qwen2.5-VL's template, without the default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    ordinary = [*_CHAT, *WORDS]
    vocab_size = len(ordinary) + len(_VISION)
    vocab = {token: index for index, token in enumerate(ordinary)}
    ids = special_token_ids(vocab_size)
    vocab.update({token: ids[name] for name, token in _VISION.items()})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    specials = ["<|im_start|>", "<|im_end|>", *_VISION.values()]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # An added (non-special) token survives the whitespace split: Qwen's "\n" is one token.
    backend.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token=_VISION["pad"],
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def processor(*, image_side: int = 56) -> ImageQwen2_5_VLProcessor:
    tok = tokenizer()
    model_config = tiny_qwen2_5_vl(vocab_size=len(tok)).config
    proc = ImageQwen2_5_VLProcessor(
        image_processor=tiny_qwen_image_processor(max_side=image_side),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    # What verl.utils.hf_processor does for a Qwen2.5-VL processor: multimodal RoPE positions.
    proc.config = model_config
    proc.get_rope_index = types.MethodType(Qwen2_5_VLModel.get_rope_index, proc)
    proc.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, proc)
    return proc


def model(proc: ImageQwen2_5_VLProcessor, *, seed: int = 0):
    return tiny_qwen2_5_vl(vocab_size=len(proc.tokenizer), seed=seed)
