"""The actor's model as verl's FSDP engine runs it, for the attack's forward passes.

verl's engine (``verl/workers/engine/fsdp/transformer_impl.py``) builds its model with
``apply_monkey_patch`` and feeds it, per micro-batch, in one of two layouts:

- ``use_remove_padding=False``: ``input_ids [B, L]``, ``attention_mask [B, L]`` and the
  position ids verl computed when it built the rows (``[4, B, L]`` for multimodal RoPE: the
  text positions, then the three vision axes);
- ``use_remove_padding=True``: the real tokens of all rows packed into one row,
  ``input_ids [1, nnz]``, ``attention_mask=None``, ``position_ids [4, 1, nnz]``; sequence
  boundaries are where the text positions restart at 0 (verl's attention turns them into
  varlen ``cu_seqlens``). A batch without position ids gets them in verl's layout here (text
  positions, then the model's own multimodal RoPE positions).

:class:`EngineModel` presents the engine's model to :func:`saei_fast.entropy_attack` with its
base model fed in the engine's layout (:class:`PackedBase` packs and unpacks), so the pixel
gradient is that of the function the engine trains and samples from. Ulysses sequence
parallelism splits each packed row over ranks inside the model; the attack does not take
part in that exchange, so it is refused (:func:`check_engine`).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from saei_fast.attack.model import unwrap_peft, with_position_ids


def check_engine(engine: object) -> bool:
    """``use_remove_padding`` of verl's engine, after refusing what the attack cannot run.

    Raises:
        ValueError: Ulysses sequence parallelism (``ulysses_sequence_parallel_size > 1``).
    """
    sp_size = getattr(engine, "ulysses_sequence_parallel_size", 1)
    if sp_size != 1:
        raise ValueError(
            "SaEI's actor attack does not support Ulysses sequence parallelism: "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size must be 1, got "
            f"{sp_size}"
        )
    return bool(getattr(engine, "use_remove_padding", False))


class PackedBase(torch.nn.Module):
    """The base model called with ``use_remove_padding``'s packed inputs; hidden states come
    back in the padded ``[B, L, D]`` layout (zeros at padding), as the attack reads them."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **fields,
    ) -> BaseModelOutputWithPast:
        real = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        if position_ids is None:
            position_ids = self._engine_position_ids(input_ids, real, fields)
        # Only the positions read it; it is per row and would not match the packed row.
        fields.pop("mm_token_type_ids", None)
        if position_ids.dim() == 3:  # [k, B, L] -> [k, 1, nnz]
            packed_positions = position_ids[:, real].unsqueeze(1)
        else:  # [B, L] -> [1, nnz]
            packed_positions = position_ids[real].unsqueeze(0)
        fields.pop("mm_token_type_ids", None)  # per-row; the positions already encode it
        outputs = self.base(
            input_ids=input_ids[real].unsqueeze(0),
            pixel_values=pixel_values,
            attention_mask=None,
            position_ids=packed_positions,
            **fields,
        )
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            hidden = outputs[0]
        padded = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
        return BaseModelOutputWithPast(
            last_hidden_state=padded.masked_scatter(real.unsqueeze(-1), hidden[0])
        )

    def _engine_position_ids(self, input_ids, real, fields) -> torch.Tensor:
        """verl's layout for a batch that brings none: the text positions of every row (0 at
        its first real token, which is where a packed sequence starts), then the model's own
        multimodal RoPE positions (``[4, B, L]``; ``[B, L]`` without multimodal RoPE)."""
        text = (real.long().cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": input_ids, "attention_mask": real.long(), **fields}
        vision = with_position_ids(self.base, batch).get("position_ids")
        return text if vision is None else torch.cat([text[None], vision])


class EngineModel(torch.nn.Module):
    """The engine's (patched) Hugging Face VLM with the parts ``entropy_attack`` reads: the
    head, the config, and a base model fed in the engine's layout."""

    def __init__(self, model: torch.nn.Module, *, remove_padding: bool) -> None:
        super().__init__()
        self.model = unwrap_peft(model)
        self.packed = PackedBase(self.model.base_model) if remove_padding else None

    @property
    def base_model(self) -> torch.nn.Module:
        return self.packed if self.packed is not None else self.model.base_model

    @property
    def config(self):
        return self.model.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()
