"""The attack client: every request answered (never a lost wake-up), failures and timeouts on
every waiting group, equal settings sharing calls, padding spread over ranks without
recomputation.

The client's calls go to a stand-in dispatcher (an object with ``call.remote``), so that
calls can be made slow, failing or stuck at will; the dispatcher's own padding runs with
verl's ``DataProto.chunk`` / ``DataProto.concat`` (what verl's data-parallel dispatch does
to a worker-method call) and the worker's real ``run_groups``, with the attack itself
replaced by a recorder. The real Ray path is in ``test_verl_ray.py``.
"""

import asyncio
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from verl import DataProto

from saei_fast import pixels
from saei_fast.attack import AttackConfig
from saei_fast.integrations.verl import worker
from saei_fast.integrations.verl.client import AttackDispatcher, RayAttackClient, pad_groups
from saei_fast.tools.testing import tiny_qwen_image_processor


class _Remote:
    def __init__(self, function):
        self.remote = function


class StandInDispatcher:
    """``AttackDispatcher``'s handle: answers every group with its own ``id``; records calls
    and whether one is in flight."""

    def __init__(self, *, delay=(0.0, 0.0), fail=False, stuck=False, seed=0):
        self.delay, self.fail, self.stuck = delay, fail, stuck
        self.rng = random.Random(seed)
        self.calls: list[list[int]] = []
        self.in_flight = False
        self.call = _Remote(self._call)

    async def _call(self, groups, space, config, mode):
        self.calls.append([group["id"] for group in groups])
        self.in_flight = True
        try:
            if self.stuck:
                await asyncio.Event().wait()
            await asyncio.sleep(self.rng.uniform(*self.delay))
            if self.fail:
                raise RuntimeError("rank 1 died: NCCL watchdog timeout")
            return [{"id": group["id"], "mode": mode} for group in groups]
        finally:
            self.in_flight = False


def _space():
    return pixels.from_processor(tiny_qwen_image_processor())


def _client(dispatcher, **kwargs):
    return RayAttackClient(["w0", "w1"], "actor", dispatcher=dispatcher, **kwargs)


def test_hundreds_of_requests_at_random_times_all_resolve():
    dispatcher = StandInDispatcher(delay=(0.0, 0.03))
    client = _client(dispatcher, wait_seconds=0.005)
    rng = random.Random(1)
    during_call = []

    async def request(number):
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        during_call.append(dispatcher.in_flight)
        # every agent loop builds its own space and config objects
        results = await client.attack(
            [{"id": number}], space=_space(), config=AttackConfig(alpha=2 / 255)
        )
        return results[0]["id"]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(request(n) for n in range(400))), 60)

    answered = asyncio.run(main())
    assert answered == list(range(400))  # every request, with its own answer
    assert sum(during_call) >= 20  # many arrived while a call was in flight
    assert sorted(i for call in dispatcher.calls for i in call) == list(range(400))
    assert len(dispatcher.calls) < 200  # shared calls, though every request made new objects


def test_the_last_request_arriving_during_a_call_is_served():
    """Nothing arrives after it, so only the sender itself can pick it up."""
    dispatcher = StandInDispatcher(delay=(0.2, 0.2))
    client = _client(dispatcher, wait_seconds=0.01)

    async def main():
        first = asyncio.ensure_future(
            client.attack([{"id": 0}], space=_space(), config=AttackConfig())
        )
        while not dispatcher.in_flight:
            await asyncio.sleep(0.001)
        last = await client.attack([{"id": 1}], space=_space(), config=AttackConfig())
        return await first, last

    first, last = asyncio.run(asyncio.wait_for(main(), 10))
    assert (first[0]["id"], last[0]["id"]) == (0, 1)
    assert dispatcher.calls == [[0], [1]]


def test_requests_with_equal_settings_share_a_call_and_others_do_not():
    dispatcher = StandInDispatcher()
    client = _client(dispatcher, wait_seconds=0.05)
    config = AttackConfig(alpha=2 / 255)

    async def main():
        return await asyncio.gather(
            client.attack([{"id": 0}], space=_space(), config=config),
            client.attack([{"id": 1}], space=_space(), config=replace(config)),
            client.attack([{"id": 2}], space=_space(), config=replace(config, alpha=3 / 255)),
            client.attack([{"id": 3}], space=_space(), config=config, mode="gradient"),
        )

    results = asyncio.run(main())
    assert [r[0]["id"] for r in results] == [0, 1, 2, 3]
    assert sorted(dispatcher.calls) == [[0, 1], [2], [3]]


def test_a_failing_call_fails_every_waiting_group_and_the_client_recovers():
    dispatcher = StandInDispatcher(fail=True)
    client = _client(dispatcher)

    async def main():
        return await asyncio.gather(
            *(client.attack([{"id": n}], space=_space(), config=AttackConfig()) for n in range(5)),
            return_exceptions=True,
        )

    errors = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(error, RuntimeError) for error in errors)
    assert all("rank 1 died" in str(error) and "5 group(s)" in str(error) for error in errors)
    dispatcher.fail = False
    assert asyncio.run(client.attack([{"id": 9}], space=_space(), config=AttackConfig())) == [
        {"id": 9, "mode": "attack"}
    ]


def test_a_stuck_call_times_out_naming_the_setting():
    client = _client(StandInDispatcher(stuck=True), timeout_s=0.2)

    async def main():
        return await asyncio.gather(
            *(client.attack([{"id": n}], space=_space(), config=AttackConfig()) for n in range(3)),
            return_exceptions=True,
        )

    errors = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(error, TimeoutError) for error in errors)
    assert all("saei.attack_timeout_s=0.2" in str(error) for error in errors)


def test_a_cancelled_sender_fails_its_requests_instead_of_leaving_them_waiting():
    dispatcher = StandInDispatcher(stuck=True)
    client = _client(dispatcher, wait_seconds=0.01)

    async def main():
        waiting = [
            asyncio.ensure_future(client.attack([{"id": n}], space=_space(), config=config))
            for n, config in enumerate((AttackConfig(), AttackConfig(alpha=3 / 255)))
        ]
        while not dispatcher.in_flight:
            await asyncio.sleep(0.001)
        client._sender.cancel()  # e.g. the agent-loop worker shutting down
        return await asyncio.gather(*waiting, return_exceptions=True)

    errors = asyncio.run(asyncio.wait_for(main(), 10))
    assert all(isinstance(error, asyncio.CancelledError) for error in errors)


@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("groups", [1, 2, 3, 5, 8, 9])
def test_padding_up_to_a_multiple_of_the_ranks(world_size, groups):
    padded = pad_groups([{"id": n} for n in range(groups)], world_size)
    assert len(padded) % world_size == 0
    assert len(padded) - groups == (-groups) % world_size < world_size
    assert [g["id"] for g in padded[:groups]] == list(range(groups))
    assert all(g.get("saei_pad") for g in padded[groups:])
    assert not any(g.get("saei_pad") for g in padded[:groups])


class _WorkerGroup:
    """A worker group of ``world_size`` ranks: the call is split with ``DataProto.chunk`` and
    joined with ``DataProto.concat``, as verl's data-parallel dispatch does, and each rank
    runs the worker's ``run_groups``."""

    def __init__(self, world_size, run_padding=False):
        self.world_size, self.run_padding = world_size, run_padding
        self.computed: list[list[int]] = []

    def saei_attack(self, data):
        outputs = []
        for rank_data in data.chunk(self.world_size):
            meta = rank_data.meta_info
            results = worker.run_groups(
                torch.nn.Linear(1, 1),
                list(rank_data.non_tensor_batch["saei_group"]),
                space=meta["saei_space"],
                config=meta["saei_config"],
                mode=meta["saei_mode"],
                run_padding=self.run_padding,
            )
            self.computed.append([int(r["pixel_values"]) for r in results if r is not None])
            column = np.empty(len(results), dtype=object)
            column[:] = results
            outputs.append(DataProto.from_dict(non_tensors={"saei_result": column}))
        return DataProto.concat(outputs)


class _Result:
    def __init__(self, group_id):
        self.pixel_values = torch.full((1, 1), float(group_id))
        self.entropy_before = self.entropy_after = float(group_id)
        self.num_selected = 1
        self.group_entropy_before = self.group_entropy_after = torch.tensor([float(group_id)])
        self.peak_memory_bytes = 0


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_groups_are_spread_over_the_ranks_without_recomputation(world_size, monkeypatch):
    def recorder(model, inputs, completion_mask, *, space, config):
        return _Result(int(inputs["id"][0]))

    monkeypatch.setattr(worker, "entropy_attack", recorder)
    dispatcher = AttackDispatcher(["w"], "actor")
    dispatcher._group = _WorkerGroup(world_size)
    groups = [
        {"id": torch.tensor([n]), "completion_mask": torch.ones(1, 2), "image_rows": 1}
        for n in range(5)
    ]
    results = dispatcher.call(groups, _space(), AttackConfig(), "attack")
    assert [int(r["pixel_values"]) for r in results] == list(range(5))
    computed = dispatcher._group.computed
    assert sorted(i for rank in computed for i in rank) == list(range(5))  # each group once
    per_rank = -(-5 // world_size)
    assert [len(rank) for rank in computed] == [
        min(per_rank, max(0, 5 - per_rank * rank)) for rank in range(world_size)
    ]
    # FSDP1 keeps its ranks in lock-step: there the padding groups run (and are dropped)
    dispatcher._group = _WorkerGroup(world_size, run_padding=True)
    dispatcher.call(groups, _space(), AttackConfig(), "attack")
    assert sum(len(rank) for rank in dispatcher._group.computed) == 5 + (-5) % world_size
