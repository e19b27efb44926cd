"""Deprecated alias of :mod:`saei_fast.tools.testing` (tiny test VLMs, processors and
batches), kept because earlier releases documented ``from saei_fast.testing import ...``.
Importing it warns once with a DeprecationWarning.
"""

import warnings

from saei_fast.tools.testing import (
    VLMBatch,
    random_images,
    special_token_ids,
    tiny_idefics3,
    tiny_idefics3_image_processor,
    tiny_llava,
    tiny_llava_image_processor,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

__all__ = [
    "VLMBatch",
    "random_images",
    "special_token_ids",
    "tiny_idefics3",
    "tiny_idefics3_image_processor",
    "tiny_llava",
    "tiny_llava_image_processor",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_qwen_image_processor",
    "vlm_batch",
]


warnings.warn(
    "saei_fast.testing is deprecated: import from saei_fast.tools.testing instead",
    DeprecationWarning,
    stacklevel=2,  # the importing module (warnings skips the import machinery's frames)
)
