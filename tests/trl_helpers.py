"""Shared pieces of the SaEIGRPOTrainer tests: the config and the trainer, a recording
reward, a recorder of what the model was given, and a stand-in for TRL's vLLM server
backend."""

from __future__ import annotations

import pytest
import torch

from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer
from saei_fast.tools.demo.model import vision_token_ids

N_CLEAN, N_ADV = 2, 2
GROUP = N_CLEAN + N_ADV
ALPHA = 8 / 255
PATCHES = 16  # a 56 x 56 image: 4 x 4 patches of 14 pixels

# A trainer test file's ``pytestmark``: transformers 5 deprecates TrainingArguments names that
# TRL 1.16 still sets, and the tiny models run on one intra-op thread for the whole module
# (``one_thread`` in shared_fixtures.py).
TRAINER_MARKS = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def no_stop_tokens(model, processor) -> list[int]:
    """Vision placeholders (never sampled) and every stop/special token, so that every
    completion has exactly max_completion_length ordinary words: distinct enough across
    rows to tell which generate call produced which row."""
    tokenizer = processor.tokenizer
    special = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    return sorted(set(vision_token_ids(model)) | set(special))


def make_config(tmp_path, **overrides) -> SaEIConfig:
    settings = dict(
        output_dir=str(tmp_path),
        num_generations=GROUP,
        saei_n_clean=N_CLEAN,
        saei_n_adv=N_ADV,
        saei_alpha=ALPHA,
        per_device_train_batch_size=2 * GROUP,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        loss_type="grpo",
        beta=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    settings.update(overrides)
    return SaEIConfig(**settings)


def make_trainer(
    model,
    processor,
    dataset,
    tmp_path,
    *,
    reward_funcs=None,
    full_length: bool = True,
    generation_kwargs: dict | None = None,
    eval_dataset=None,
    **overrides,
) -> SaEIGRPOTrainer:
    """A SaEIGRPOTrainer of ``model`` on ``dataset`` with ``make_config(tmp_path,
    **overrides)`` and a fresh :class:`Rewards` unless ``reward_funcs`` is given. With
    ``full_length``, generation never samples a stop token (:func:`no_stop_tokens`), so every
    completion is ``max_completion_length`` long; ``generation_kwargs`` add to that (without
    ``full_length``, they are the config's whole ``generation_kwargs``)."""
    if full_length:
        suppress = {"suppress_tokens": no_stop_tokens(model, processor)}
        generation_kwargs = {**suppress, **(generation_kwargs or {})}
    if generation_kwargs is not None:
        overrides["generation_kwargs"] = generation_kwargs
    return SaEIGRPOTrainer(
        model=model,
        reward_funcs=Rewards() if reward_funcs is None else reward_funcs,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )


class Rewards:
    """A reward that varies across completions (sum of ids mod 5), recorded per call."""

    __name__ = "id_sum_reward"

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, completion_ids, **_):
        values = [float(sum(ids) % 5) / 4 for ids in completion_ids]
        self.calls.append(values)
        return values


class ModelRecorder:
    """Records every ``generate`` call (inputs and output) and the pixel values of every
    backbone forward with gradients outside generation and the attack (the policy-loss
    forwards; the backbone runs under either head, TRL's or saei-fast's, and the attack's
    pixel values are the only ones that require grad)."""

    def __init__(self, model) -> None:
        self.generate_calls, self.loss_pixels = [], []
        self._generating = False
        original = model.generate

        def generate(*args, **kwargs):
            self._generating = True
            try:
                output = original(*args, **kwargs)
            finally:
                self._generating = False
            self.generate_calls.append(
                {
                    "input_ids": kwargs["input_ids"].clone(),
                    "pixel_values": kwargs["pixel_values"].clone(),
                    "image_grid_thw": kwargs["image_grid_thw"].clone(),
                    "completions": output[:, kwargs["input_ids"].shape[1] :].clone(),
                }
            )
            return output

        model.generate = generate  # this instance only
        model.model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, _module, _args, kwargs):
        pixel_values = kwargs.get("pixel_values")
        if self._generating or not torch.is_grad_enabled() or pixel_values is None:
            return
        if not pixel_values.requires_grad:
            self.loss_pixels.append(pixel_values.detach().clone())


def capture_scored_batches(trainer) -> list[dict]:
    """The output of every ``_generate_and_score_completions`` call (rows in generation
    order, before TRL shuffles them)."""
    outputs = []
    original = trainer._generate_and_score_completions

    def capture(inputs):
        output = original(inputs)
        outputs.append({k: v.clone() if torch.is_tensor(v) else v for k, v in output.items()})
        return output

    trainer._generate_and_score_completions = capture
    return outputs


def image_blocks(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    return list(pixel_values.split(PATCHES))


def index_of(block: torch.Tensor, candidates: list[torch.Tensor]) -> int:
    matches = [i for i, c in enumerate(candidates) if torch.equal(block, c)]
    assert len(matches) == 1, "a row's pixels are none (or several) of the expected images"
    return matches[0]


class FakeVLLMServer:
    """Stands in for TRL's ``VLLMGeneration`` (vLLM is not installed here), with its
    contract: prompts and images arrive as runs of ``num_generations`` copies, and like the
    server it keeps each run's first prompt and image and samples ``num_generations``
    completions for it. It returns the log-probs of the sampled tokens under the image it
    was given, as vLLM does, and the prompt ids the engine reports:

    - ``mode="server"``: TRL 1.16's server path pairs the server's image features with the
      ids it sent and echoes those ids back;
    - ``mode="colocate"``: ``RequestOutput.prompt_token_ids`` of ``LLM.generate`` on
      ``prompt_token_ids`` + ``multi_modal_data``, where vLLM's own prompt update replaces
      the first image token of each image by the image's whole run of image tokens. Ids
      that the processor already expanded (what TRL 1.16 sends) grow from a run of N image
      tokens to 2N - 1 (TRL issues 6294 / 6401). The completions are sampled from the
      trainer's prompt either way (the tiny model cannot run the corrupted one); only the
      report differs.
    """

    def __init__(self, model, processor, max_tokens: int, mode: str = "server") -> None:
        assert mode in ("server", "colocate")
        self.model, self.processor, self.max_tokens = model, processor, max_tokens
        self.mode = mode
        self.calls = []

    def reported_prompt(self, ids: list[int]) -> list[int]:
        """The prompt ids vLLM reports for the trainer's (processor-expanded) ``ids``."""
        if self.mode == "server":
            return list(ids)
        image = self.model.config.image_token_id
        out, position = [], 0
        while position < len(ids):
            if ids[position] != image:
                out.append(ids[position])
                position += 1
                continue
            run = 1
            while position + run < len(ids) and ids[position + run] == image:
                run += 1
            # vLLM's update turns the run's first token into a run of `run` tokens; the
            # rest of the already expanded run stays.
            out += [image] * (2 * run - 1)
            position += run
        return out

    def sync_weights(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls.append({"prompts": prompts, "images": images, "n": num_generations})
        prompts = [p for p in prompts[::num_generations] for _ in range(num_generations)]
        images = [i for i in images[::num_generations] for _ in range(num_generations)]
        flat = [image for row in images for image in row]
        pixels = self.processor.image_processor(flat, return_tensors="pt")
        input_ids = torch.tensor(prompts)  # one question: all prompts have the same length
        mm_types = (input_ids == self.model.config.image_token_id).long()
        inputs = dict(pixels, input_ids=input_ids, mm_token_type_ids=mm_types)
        output = self.model.generate(
            **inputs,
            do_sample=True,
            max_new_tokens=self.max_tokens,
            suppress_tokens=no_stop_tokens(self.model, self.processor),
        )
        completions = output[:, input_ids.shape[1] :]
        inputs["input_ids"] = output
        inputs["mm_token_type_ids"] = torch.cat([mm_types, torch.zeros_like(completions)], 1)
        logits = self.model(**inputs).logits[:, input_ids.shape[1] - 1 : -1].float()
        logps = logits.log_softmax(-1).gather(-1, completions[..., None]).tolist()
        self.calls[-1]["logps"] = logps
        return [self.reported_prompt(p) for p in prompts], completions.tolist(), logps, None
