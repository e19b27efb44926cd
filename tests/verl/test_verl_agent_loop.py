"""The ``saei_agent`` loop inside verl's own agent-loop worker, against a stand-in server.

verl's ``AgentLoopWorker.generate_sequences`` runs as in a training step: it looks the agent
loop up in the registry the plugin filled, instantiates it through Hydra with verl's
arguments, runs one coroutine per row (clean and adversarial rows of one uid, in one
process), and post-processes the rows, re-running the processor on the images each row
returns (the inputs of old/ref log-probs and the update). Only the worker's constructor is
replaced, because it loads the model, tokenizer and processor from a checkpoint directory.
The stand-in server manager has the interface of verl's ``LLMServerClient.generate`` and
records what each request was sampled from; the attack client runs the worker method's
body (:func:`saei_fast.integrations.verl.worker.saei_attack_on`) on a tiny Qwen2.5-VL in
this process.
"""

import asyncio

import _tiny_chat
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, DictConfigWrap
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from saei_fast import pixels
from saei_fast.attack import AttackConfig, entropy_attack
from saei_fast.integrations.verl import agent_loop as saei_agent_loop
from saei_fast.integrations.verl.client import set_attack_client
from saei_fast.integrations.verl.worker import saei_attack_on
from saei_fast.tools.testing import random_images

N_CLEAN, N_ADV = 3, 2
QUESTION = "which colour covers most of the image ?"
ANSWERS = ("red", "green", "blue")


class StandInServer:
    """``LLMServerClient.generate``'s interface; answers with words of the vocabulary."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        self.requests: dict[int, dict] = {}  # by priority: verl gives every row its own

    async def generate(
        self,
        request_id,
        *,
        prompt_ids,
        sampling_params,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority=0,
        **kwargs,
    ) -> TokenOutput:
        await asyncio.sleep(0)  # let the other rows of the group run, as a real server does
        words = self.rng.choice(ANSWERS, size=int(self.rng.integers(2, 6))).tolist()
        token_ids = [*self.tokenizer.convert_tokens_to_ids(words), self.tokenizer.eos_token_id]
        self.requests[priority] = {
            "prompt_ids": list(prompt_ids),
            "images": list(image_data),
            "response": token_ids,
        }
        log_probs = self.rng.uniform(-3.0, 0.0, len(token_ids)).tolist()
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason="completed")


class LocalAttackClient:
    """The client interface of :mod:`saei_fast.integrations.verl.client`, running the worker
    method's body in this process."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    async def attack(self, batches, *, space, config, mode="attack"):
        self.calls += 1
        column = np.empty(len(batches), dtype=object)
        column[:] = batches
        data = DataProto.from_dict(
            non_tensors={"saei_group": column},
            meta_info={"saei_space": space, "saei_config": config, "saei_mode": mode},
        )
        return list(saei_attack_on(self.model, data).non_tensor_batch["saei_result"])


class RefusingClient:
    async def attack(self, *args, **kwargs):
        raise AssertionError("perturbation=random must not ask the actor")


class _Dataset(RLHFDataset):
    """verl's dataset class with its image extraction done here: verl's goes through
    ``qwen_vl_utils``, which imports torchvision (not installed for these tests). For PIL
    images whose sides are multiples of 28, as here, ``qwen_vl_utils`` returns them as
    they are, in RGB."""

    @classmethod
    def _process_multi_modal_info(cls, messages, image_patch_size, config):
        images = [
            part["image"].convert("RGB")
            for message in messages
            if isinstance(message["content"], list)
            for part in message["content"]
            if part.get("type") == "image"
        ]
        return images or None, None, None


class _Worker(AgentLoopWorker):
    """verl's agent-loop worker with the checkpoint loading of its constructor left out."""

    def __init__(self, config, server, processor) -> None:
        self.config = config
        self.llm_client = server
        self.teacher_client = None
        self.reward_loop_worker_handles = None
        self.rollout_config = config.actor_rollout_ref.rollout
        self.dataset_cls = _Dataset
        self.tokenizer = processor.tokenizer
        self.processor = processor
        self.hf_model_type = "qwen2_5_vl"
        self.mm_processor_kwargs = {}
        self.distillation_enabled = False
        self.tools = []


def _config(**saei) -> OmegaConf:
    return OmegaConf.create(
        {
            "saei": {"n_clean": N_CLEAN, "n_adv": N_ADV, "alpha": 2 / 255, **saei},
            "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
            "actor_rollout_ref": {
                "rollout": {
                    "n": N_CLEAN + N_ADV,
                    "prompt_length": 64,
                    "response_length": 8,
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "top_k": -1,
                    "calculate_log_probs": True,
                    "val_kwargs": {"n": 1, "top_p": 1.0, "top_k": -1, "temperature": 0.0},
                    "agent": {"default_agent_loop": "saei_agent", "num_workers": 1},
                }
            },
        }
    )


def _prompts(images, uids) -> DataProto:
    """Rows as verl's agent-loop manager hands them to a worker: each prompt repeated ``n``
    times (interleaved), every row with the prompt's uid and its own priority."""
    group = N_CLEAN + N_ADV
    raw_prompt, uid, index = [], [], []
    for number, (image, prompt_uid) in enumerate(zip(images, uids, strict=True)):
        content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
        for _ in range(group):
            raw_prompt.append([{"role": "user", "content": content}])
            uid.append(prompt_uid)
            index.append(number)
    column = np.empty(len(raw_prompt), dtype=object)
    column[:] = raw_prompt
    return DataProto.from_dict(
        non_tensors={
            "raw_prompt": column,
            "uid": np.array(uid, dtype=object),
            "index": np.array(index),
            "priority": np.arange(len(raw_prompt)),
        },
        meta_info={"global_steps": 1},
    )


@pytest.fixture(scope="module")
def tiny():
    processor = _tiny_chat.processor()
    return processor, _tiny_chat.model(processor), pixels.from_processor(processor)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _expected_adversarial(model, processor, space, server, rows):
    """``entropy_attack`` on the group's clean rows, assembled here from the requests the
    server saw: prompt + response per row, right-padded, one copy of the image per row."""
    clean = [server.requests[row] for row in rows]
    prompt = clean[0]["prompt_ids"]
    width = len(prompt) + max(len(request["response"]) for request in clean)
    pad = processor.tokenizer.pad_token_id
    input_ids, attention, completion = [], [], []
    for request in clean:
        row = prompt + request["response"]
        fill = width - len(row)
        input_ids.append(row + [pad] * fill)
        attention.append([1] * len(row) + [0] * fill)
        completion.append(
            [False] * len(prompt) + [True] * len(request["response"]) + [False] * fill
        )
    image_inputs = processor.image_processor(clean[0]["images"], return_tensors="pt")
    input_ids = torch.tensor(input_ids)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor(attention),
        "pixel_values": image_inputs["pixel_values"].repeat(len(clean), 1),
        "image_grid_thw": image_inputs["image_grid_thw"].repeat(len(clean), 1),
        "mm_token_type_ids": (input_ids == processor.image_token_id).long(),
    }
    result = entropy_attack(
        model,
        inputs,
        torch.tensor(completion),
        space=space,
        config=AttackConfig(alpha=2 / 255, group_size=len(clean)),
    )
    rows_of_image = image_inputs["pixel_values"].shape[0]
    grid = image_inputs["image_grid_thw"]
    return space.to_pil(result.pixel_values[:rows_of_image], image_grid_thw=grid)[0]


def _run(worker, batch) -> DataProto:
    return asyncio.run(worker.generate_sequences(batch))


def test_clean_rows_then_adversarial_rows_all_updating_on_the_clean_image(tiny):
    processor, model, space = tiny
    torch.manual_seed(0)
    images = random_images(2, (56, 56), seed=7)
    server = StandInServer(processor.tokenizer, seed=0)
    client = LocalAttackClient(model)
    set_attack_client(client)
    try:
        output = _run(_Worker(_config(), server, processor), _prompts(images, ["uid-a", "uid-b"]))
    finally:
        set_attack_client(None)

    group = N_CLEAN + N_ADV
    assert len(output) == 2 * group
    assert client.calls == 2  # one attack per prompt group
    assert not saei_agent_loop._GROUPS  # nothing left behind for the next step
    flags = output.non_tensor_batch["saei_adversarial"].tolist()
    assert flags == ([False] * N_CLEAN + [True] * N_ADV) * 2
    assert output.non_tensor_batch["uid"].tolist() == ["uid-a"] * group + ["uid-b"] * group
    # the attack's numbers, once per group, on its first adversarial row
    before = output.non_tensor_batch["saei_entropy_before"].tolist()
    assert [value is not None for value in before] == (
        [False] * N_CLEAN + [True] + [False] * (N_ADV - 1)
    ) * 2
    assert all(value > 0 for value in before if value is not None)
    assert all(n > 0 for n in output.non_tensor_batch["saei_selected_tokens"] if n is not None)

    for number, image in enumerate(images):
        rows = range(number * group, (number + 1) * group)
        sent = [server.requests[row] for row in rows]
        # rows 0..n_clean-1 are sampled from the clean image, the rest from one other image
        for request in sent[:N_CLEAN]:
            assert np.array_equal(_pixels(request["images"][0]), _pixels(image))
        adversarial = sent[N_CLEAN]["images"][0]
        for request in sent[N_CLEAN:]:
            assert request["images"][0] is adversarial
        expected = _expected_adversarial(model, processor, space, server, list(rows)[:N_CLEAN])
        assert np.array_equal(_pixels(adversarial), _pixels(expected))
        # one signed step of 2/255, exact in uint8
        assert np.abs(_pixels(adversarial) - _pixels(image)).max() == 2
        # every row, adversarial ones included, updates on the clean image
        clean_inputs = processor.image_processor([image], return_tensors="pt")
        for row in rows:
            mm_inputs = output.non_tensor_batch["multi_modal_inputs"][row]
            torch.testing.assert_close(mm_inputs["pixel_values"], clean_inputs["pixel_values"])
        # the rows' tokens are what the server returned
        for row, request in zip(rows, sent, strict=True):
            response = output.batch["responses"][row]
            length = int(output.batch["response_mask"][row].sum())
            assert response[:length].tolist() == request["response"]


def test_session_ids_set_the_roles(tiny):
    """verl's v1 manager passes ``session_id``; the rows of a group may start in any order."""
    processor, model, _ = tiny
    image = random_images(1, (56, 56), seed=3)[0]
    config = _config()
    server = StandInServer(processor.tokenizer, seed=1)
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    row = {"raw_prompt": [{"role": "user", "content": content}], "uid": "uid-s"}
    order = [4, 0, 3, 2, 1]  # an adversarial row starts first

    async def run():
        loops = [
            saei_agent_loop.SaEIAgentLoop(
                trainer_config=DictConfigWrap(config),
                server_manager=server,
                tokenizer=processor.tokenizer,
                processor=processor,
                dataset_cls=_Dataset,
                data_config=DictConfigWrap(config.data),
                hf_model_type="qwen2_5_vl",
            )
            for _ in order
        ]
        return await asyncio.gather(
            *(
                loop.run({"temperature": 1.0}, priority=session, session_id=session, **row)
                for loop, session in zip(loops, order, strict=True)
            )
        )

    set_attack_client(LocalAttackClient(model))
    try:
        outputs = asyncio.run(run())
    finally:
        set_attack_client(None)
    flags = {s: out.extra_fields["saei_adversarial"] for s, out in zip(order, outputs, strict=True)}
    assert flags == {0: False, 1: False, 2: False, 3: True, 4: True}
    for session in range(N_CLEAN):
        assert np.array_equal(_pixels(server.requests[session]["images"][0]), _pixels(image))
    adversarial = _pixels(server.requests[N_CLEAN]["images"][0])
    assert np.abs(adversarial - _pixels(image)).max() == 2
    assert np.array_equal(_pixels(server.requests[N_CLEAN + 1]["images"][0]), adversarial)
    assert not saei_agent_loop._GROUPS


def test_random_perturbation_uses_the_same_plumbing_without_the_actor(tiny):
    processor, _, _ = tiny
    image = random_images(1, (56, 56), seed=5)[0]
    server = StandInServer(processor.tokenizer, seed=2)
    set_attack_client(RefusingClient())
    try:
        output = _run(
            _Worker(_config(perturbation="random"), server, processor),
            _prompts([image], ["uid-r"]),
        )
    finally:
        set_attack_client(None)
    adversarial = [
        _pixels(server.requests[row]["images"][0]) for row in range(N_CLEAN, N_CLEAN + N_ADV)
    ]
    moved = np.abs(adversarial[0] - _pixels(image))
    # every pixel steps by 2/255 with a random sign; only those within 2 of 0 or 255 clip
    assert moved.max() == 2 and (moved == 2).mean() > 0.95
    assert all(np.array_equal(a, adversarial[0]) for a in adversarial)
    flags = output.non_tensor_batch["saei_adversarial"].tolist()
    assert flags == [False] * N_CLEAN + [True] * N_ADV


def test_failed_attack_fails_the_adversarial_rows_and_frees_the_group(tiny):
    processor, _, _ = tiny

    class Failing:
        async def attack(self, *args, **kwargs):
            raise RuntimeError("actor unavailable")

    set_attack_client(Failing())
    try:
        with pytest.raises(RuntimeError, match="actor unavailable"):
            _run(
                _Worker(_config(), StandInServer(processor.tokenizer, seed=3), processor),
                _prompts(random_images(1, (56, 56), seed=6), ["uid-f"]),
            )
    finally:
        set_attack_client(None)
    assert not saei_agent_loop._GROUPS


def test_mm_processor_kwargs_reach_the_attack(tiny):
    """``data.mm_processor_kwargs`` that resize the image: the actor attacks the image as
    training sees it (the same pixel values as the rows' ``multi_modal_inputs``), and the
    adversarial image has that size."""
    processor, model, _ = tiny
    image = random_images(1, (56, 56), seed=8)[0]
    config = _config()
    config.data.mm_processor_kwargs = {"min_pixels": 784, "max_pixels": 784}
    seen = []

    class Recording(LocalAttackClient):
        async def attack(self, batches, **kwargs):
            seen.extend(batches)
            return await super().attack(batches, **kwargs)

    set_attack_client(Recording(model))
    try:
        worker = _Worker(config, StandInServer(processor.tokenizer, seed=4), processor)
        worker.mm_processor_kwargs = dict(config.data.mm_processor_kwargs)
        server = worker.llm_client
        output = _run(worker, _prompts([image], ["uid-m"]))
    finally:
        set_attack_client(None)
    training = output.non_tensor_batch["multi_modal_inputs"][0]["pixel_values"]
    (batch,) = seen
    rows = batch["image_rows"]
    assert training.shape[0] == rows == 4  # 28 x 28 pixels: 2 x 2 patches, not 4 x 4
    torch.testing.assert_close(batch["pixel_values"][:rows], training)
    assert server.requests[N_CLEAN]["images"][0].size == (28, 28)
