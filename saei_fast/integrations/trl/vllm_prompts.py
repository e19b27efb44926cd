"""The check that vLLM sampled from the prompt the trainer trains on.

TRL 1.16 tokenizes a multimodal prompt with the processor, which expands each image
placeholder into the image's full run of image tokens, and hands those ids to vLLM together
with the raw images. In colocate mode vLLM runs its own multimodal processing on them and
expands the (already expanded) placeholders again: the first image token of each run becomes
a whole run, so the engine samples from a longer, corrupted prompt and reports sampling
log-probs under it, for every image row (TRL issues 6294 and 6401; open at TRL 1.16.0, the
fix in review sends vLLM a separate unexpanded copy of the prompt).

The check is behavioural, not a version bound: both vLLM paths report the prompt the engine
generated from (``RequestOutput.prompt_token_ids`` in colocate mode; the server path echoes
the ids it paired with the image features), and that prompt must have exactly as many tokens
as the trainer's own prompt row. A TRL that sends vLLM unexpanded placeholders, which vLLM
expands once, passes it; so does TRL 1.16's server mode (image features placed on the
trainer's own image-token runs); TRL 1.16's colocate mode with images fails it at the first
generation.
"""

from __future__ import annotations

from collections.abc import Sequence

TRL_ISSUES = (
    "https://github.com/huggingface/trl/issues/6294",
    "https://github.com/huggingface/trl/issues/6401",
)


class ReportedPrompts:
    """TRL's vLLM backend (``VLLMGeneration`` or a stand-in with its contract), keeping the
    prompt ids the engine reports for the latest ``generate`` call in ``reported``.

    Everything else is the backend's own (attribute reads go through).
    """

    def __init__(self, backend: object) -> None:
        self.backend = backend
        self.reported: list | None = None

    def generate(self, *args, **kwargs):
        output = self.backend.generate(*args, **kwargs)
        self.reported = output[0]  # (prompt_ids, completion_ids, logprobs, logprob_token_ids)
        return output

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def length_mismatches(
    trainer_prompts: Sequence[Sequence[int]], reported: Sequence[Sequence[int]] | None
) -> list[tuple[int, int, int]]:
    """``(row, trainer length, vLLM length)`` for every row whose reported prompt differs in
    length from the trainer's (empty when vLLM reports nothing to compare)."""
    if reported is None:
        return []
    if len(reported) != len(trainer_prompts):
        raise ValueError(
            f"vLLM reported {len(reported)} prompts for {len(trainer_prompts)} rows; "
            "the backend does not follow TRL's generate contract"
        )
    return [
        (row, len(ours), len(theirs))
        for row, (ours, theirs) in enumerate(zip(trainer_prompts, reported, strict=True))
        if theirs is not None and len(theirs) != len(ours)
    ]


def double_expansion_message(
    mismatches: list[tuple[int, int, int]], rows: int, trl_version: str, vllm_mode: str
) -> str:
    """The error for :func:`length_mismatches` found on this process (or, when it found
    none, on another one)."""
    if mismatches:
        row, ours, theirs = mismatches[0]
        found = (
            f"vLLM generated from a prompt of {theirs} tokens for row {row}, where the "
            f"trainer's prompt has {ours} ({len(mismatches)} of {rows} rows differ)"
        )
    else:
        found = "vLLM generated from prompts of other lengths than the trainer's on another process"
    return (
        f"{found}: TRL {trl_version} sends vLLM "
        f"({vllm_mode} mode) prompt ids whose image tokens the processor already expanded, "
        f"and vLLM expands them again ({', '.join(TRL_ISSUES)}). Every image row would be "
        "sampled from a corrupted prompt and scored with wrong sampling log-probs. Use "
        "vllm_mode='server' (which pairs the server's image features with the trainer's own "
        "token ids), use_vllm=False, or a TRL release that fixes these issues."
    )


__all__ = ["TRL_ISSUES", "ReportedPrompts", "double_expansion_message", "length_mismatches"]
