"""The ``saei_attack`` worker method on a local Ray CPU cluster, reached as the agent loops
reach it, and a load test: hundreds of groups through verl's real ``AgentLoopWorker``.

Two workers of :class:`_tiny_actor.TinyActorWorker` (the plugin's actor worker with a tiny
Qwen2.5-VL sharded by FSDP2 over gloo instead of verl's GPU engine) are created the way
verl's trainer creates its actor: a colocated worker class in a ``RayResourcePool``, a
``RayWorkerGroup``, ``spawn`` by role. :class:`RayAttackClient` then re-attaches to them by
their Ray names (``RayWorkerGroup.from_detached``, what an agent-loop process does with the
names the ``saei_sync`` trainer records) and calls the method with its registered dispatch.
"""

import asyncio
import time

import _tiny_chat
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from saei_fast import pixels
from saei_fast.attack import AttackConfig, entropy_attack, pixel_gradient
from saei_fast.integrations.verl.client import RayAttackClient, set_attack_client
from saei_fast.tools.testing import random_images, tiny_qwen_image_processor, vlm_batch

ROLE = "actor"
GROUP_ROWS = 3


@pytest.fixture(scope="module")
def actor_workers(ray_cluster):
    from _tiny_actor import TinyActorWorker
    from verl.single_controller.ray.base import (
        RayClassWithInitArgs,
        RayResourcePool,
        RayWorkerGroup,
        create_colocated_worker_cls,
    )

    config = OmegaConf.create({"actor": {"strategy": "fsdp", "profiler": {}}})
    worker = RayClassWithInitArgs(cls=ray_cluster.remote(TinyActorWorker), config=config, role=ROLE)
    pool = RayResourcePool([2], use_gpu=False, max_colocate_count=1)
    colocated = create_colocated_worker_cls({ROLE: worker})
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=colocated, device_name="cpu")
    actor = group.spawn(prefix_set={ROLE})[ROLE]
    actor.init_model()
    return actor


def _groups(model, processor, seeds):
    groups, batches = [], []
    for seed in seeds:
        batch = vlm_batch(
            model,
            processor,
            random_images(1, (56, 56), seed=seed),
            group_size=GROUP_ROWS,
            seed=seed,
        )
        image_rows = batch.inputs["pixel_values"].shape[0] // GROUP_ROWS
        groups.append(
            {**batch.inputs, "completion_mask": batch.completion_mask, "image_rows": image_rows}
        )
        batches.append(batch)
    return groups, batches


def test_reattached_workers_compute_the_pixel_gradient(ray_cluster, actor_workers):
    from _tiny_actor import MODEL_SEED

    torch.manual_seed(0)
    model = _tiny_chat.model(_tiny_chat.processor(), seed=MODEL_SEED)
    processor = tiny_qwen_image_processor()
    space = pixels.from_processor(processor)
    config = AttackConfig(alpha=2 / 255, micro_batch_size=2)
    # three groups on two ranks: the client pads to four, so both ranks run two groups
    groups, batches = _groups(model, processor, seeds=(1, 2, 3))
    client = RayAttackClient(actor_workers.worker_names, ROLE)
    before = actor_workers.probe()

    async def requests(mode):
        # one request per group, concurrently, as the agent loops of three prompts send them
        return await asyncio.gather(
            *(client.attack([g], space=space, config=config, mode=mode) for g in groups)
        )

    gradients = [result for results in asyncio.run(requests("gradient")) for result in results]
    dispatcher = client.dispatcher()
    assert ray_cluster.get(dispatcher.world_size.remote()) == 2
    assert ray_cluster.get(dispatcher.num_calls.remote()) == 1  # three requests, one call
    after = actor_workers.probe()
    calls = [
        a["eval_mode_calls"] - b["eval_mode_calls"] for a, b in zip(after, before, strict=True)
    ]
    assert calls == [1, 1]  # one method call on each rank
    for state in after:  # sharding and parameters as they were; no parameter gradients
        # eval mode, as verl's eval_mode leaves the module; the checkpointing layers' own
        # training flags (set for the attack) are put back
        assert not state["training"] and state["sharded"] and state["requires_grad"]
        assert state["no_grads"] and state["patched"].startswith("verl.models.transformers")

    assert len(gradients) == 3
    for result, group, batch in zip(gradients, groups, batches, strict=True):
        expected = pixel_gradient(
            model,
            batch.inputs,
            batch.completion_mask,
            space=space,
            config=AttackConfig(group_size=GROUP_ROWS),
        )
        rows = group["image_rows"]
        summed = expected.grad.reshape(GROUP_ROWS, rows, -1).sum(0)
        assert float(summed.abs().sum()) > 0
        torch.testing.assert_close(result["grad"].reshape(rows, -1), summed, rtol=1e-5, atol=1e-7)
        # micro-batches of 2 rows sum the objective in another order: float32 rounding
        assert result["objective"] == pytest.approx(expected.objective, rel=1e-6)

    attacks = [result for results in asyncio.run(requests("attack")) for result in results]
    for result, group, batch in zip(attacks, groups, batches, strict=True):
        expected = entropy_attack(
            model,
            batch.inputs,
            batch.completion_mask,
            space=space,
            config=AttackConfig(group_size=GROUP_ROWS),
        )
        torch.testing.assert_close(
            result["pixel_values"], expected.pixel_values[: group["image_rows"]]
        )
        assert result["entropy_before"] == pytest.approx(expected.entropy_before, rel=1e-6)
    # a second client (another agent-loop process) finds the same dispatcher
    other = RayAttackClient(actor_workers.worker_names, ROLE)
    assert ray_cluster.get(other.dispatcher().num_calls.remote()) == 2


def test_a_failing_rank_fails_every_waiting_group(ray_cluster, actor_workers):
    """Rank 1 gets a group it refuses (no completion token): both groups of the call get
    the error, through Ray and the dispatcher, and the workers answer the next call."""
    from _tiny_actor import MODEL_SEED

    model = _tiny_chat.model(_tiny_chat.processor(), seed=MODEL_SEED)
    processor = tiny_qwen_image_processor()
    space = pixels.from_processor(processor)
    (good, bad), _ = _groups(model, processor, seeds=(4, 5))
    bad = {**bad, "completion_mask": torch.zeros_like(bad["completion_mask"])}
    client = RayAttackClient(actor_workers.worker_names, ROLE, timeout_s=300)

    async def both(second):
        return await asyncio.gather(
            client.attack([good], space=space, config=AttackConfig()),
            client.attack([second], space=space, config=AttackConfig()),
            return_exceptions=True,
        )

    errors = asyncio.run(both(bad))
    for error in errors:
        assert isinstance(error, RuntimeError)
        assert "failed" in str(error) and "marks no completion tokens" in str(error)
    results = asyncio.run(both(good))
    assert all(isinstance(result, list) for result in results)


LOAD_GROUPS = 256


@pytest.mark.slow
def test_hundreds_of_groups_through_verls_agent_loop_worker(ray_cluster, actor_workers):
    """256 prompt groups in one ``generate_sequences`` of verl's ``AgentLoopWorker`` (the
    stand-in server of ``test_verl_agent_loop`` samples), every adversarial image computed
    by the two Ray actor workers through the real client and dispatcher."""
    from _tiny_actor import MODEL_SEED
    from test_verl_agent_loop import (
        N_ADV,
        N_CLEAN,
        StandInServer,
        _config,
        _expected_adversarial,
        _prompts,
        _Worker,
    )

    processor = _tiny_chat.processor()
    images = random_images(LOAD_GROUPS, (56, 56), seed=11)
    uids = [f"load-{number}" for number in range(LOAD_GROUPS)]
    server = StandInServer(processor.tokenizer, seed=5)
    client = RayAttackClient(actor_workers.worker_names, ROLE)
    calls_before = ray_cluster.get(client.dispatcher().num_calls.remote())
    set_attack_client(client)
    started = time.perf_counter()
    try:
        worker = _Worker(_config(), server, processor)
        output = asyncio.run(worker.generate_sequences(_prompts(images, uids)))
    finally:
        set_attack_client(None)
    seconds = time.perf_counter() - started
    calls = ray_cluster.get(client.dispatcher().num_calls.remote()) - calls_before
    print(
        f"\n{LOAD_GROUPS} groups: {seconds:.1f} s wall, {calls} dispatcher calls "
        f"({calls / LOAD_GROUPS:.3f} per group)"
    )

    group = N_CLEAN + N_ADV
    assert len(output) == LOAD_GROUPS * group
    assert output.non_tensor_batch["uid"].tolist() == [u for u in uids for _ in range(group)]
    assert calls < LOAD_GROUPS  # groups share calls
    for number, image in enumerate(images):
        rows = range(number * group, (number + 1) * group)
        sent = [server.requests[row] for row in rows]
        clean = np.asarray(image, dtype=np.int16)
        adversarial = np.asarray(sent[N_CLEAN]["images"][0], dtype=np.int16)
        # the group's own image, one signed step away (other groups' images are far off)
        assert np.abs(adversarial - clean).max() == 2
        assert all(request["images"][0] is sent[N_CLEAN]["images"][0] for request in sent[N_CLEAN:])
    model = _tiny_chat.model(processor, seed=MODEL_SEED)
    space = pixels.from_processor(processor)
    for number in (0, LOAD_GROUPS // 2, LOAD_GROUPS - 1):  # exact images, spot-checked
        rows = list(range(number * group, number * group + N_CLEAN))
        expected = _expected_adversarial(model, processor, space, server, rows)
        sent = server.requests[number * group + N_CLEAN]["images"][0]
        assert np.array_equal(np.asarray(sent), np.asarray(expected))
