"""How an agent loop reaches the actor's ``saei_attack`` worker method.

Agent loops run in verl's agent-loop worker processes, apart from the trainer that holds the
actor worker group. The ``saei_sync`` trainer writes the actor workers' Ray names and role
into ``config.saei._runtime`` before the agent-loop workers are created (they receive the
config). Every process then sends its requests to one Ray actor, :class:`AttackDispatcher`
(named after the workers, created by whichever process asks first), which re-attaches to
the workers with verl's ``RayWorkerGroup.from_detached`` and calls the method with its
registered dispatch, one call at a time.

One caller, one call at a time, because the method runs FSDP collectives: two calls in
flight at once (from two agent-loop processes, or two threads of one) can reach the ranks
in different orders, and the ranks then wait on each other's all-gathers for ever. Within a
process, requests of groups that arrive within ``wait_seconds`` of each other go out as one
call, padded to a multiple of the worker count, so every rank runs the same number of groups.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

_CLIENT = None


class AttackDispatcher:
    """Calls ``saei_attack`` on the actor workers, one call at a time (a Ray actor of one
    thread: Ray runs its calls in order)."""

    def __init__(self, worker_names: Sequence[str], role: str) -> None:
        self.worker_names, self.role = list(worker_names), role
        self._group = None
        self.calls = 0

    def worker_group(self):
        if self._group is None:
            import ray
            from verl.single_controller.ray.base import (
                RayClassWithInitArgs,
                RayWorkerGroup,
                create_colocated_worker_cls,
            )

            from saei_fast.integrations.verl.worker import SaEIActorRolloutRefWorker

            # The trainer made the workers from a colocated class keyed by role; the same
            # class here binds the same (role-prefixed) method names.
            cls = create_colocated_worker_cls(
                {self.role: RayClassWithInitArgs(cls=ray.remote(SaEIActorRolloutRefWorker))}
            )
            group = RayWorkerGroup.from_detached(
                worker_names=self.worker_names, ray_cls_with_init=cls
            )
            self._group = group.spawn(prefix_set={self.role})[self.role]
        return self._group

    def world_size(self) -> int:
        return self.worker_group().world_size

    def call(self, groups: list[dict], space, config, mode: str) -> list[dict]:
        from verl import DataProto

        group = self.worker_group()
        real = len(groups)
        groups = groups + [groups[-1]] * (-real % group.world_size)  # same count on every rank
        column = np.empty(len(groups), dtype=object)
        column[:] = groups
        data = DataProto.from_dict(
            non_tensors={"saei_group": column},
            meta_info={"saei_space": space, "saei_config": config, "saei_mode": mode},
        )
        self.calls += 1
        output = group.saei_attack(data)
        return list(output.non_tensor_batch["saei_result"])[:real]

    def num_calls(self) -> int:
        return self.calls


def dispatcher_name(worker_names: Sequence[str]) -> str:
    return f"saei-attack-dispatcher:{worker_names[0]}"


class RayAttackClient:
    """Batches attack requests of one process and sends them to the shared dispatcher."""

    def __init__(self, worker_names: Sequence[str], role: str, *, wait_seconds: float = 0.05):
        if not worker_names:
            raise ValueError("worker_names must name the actor workers, got none")
        self.worker_names, self.role, self.wait_seconds = list(worker_names), role, wait_seconds
        self._dispatcher = None
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flush: asyncio.Task | None = None

    def dispatcher(self):
        """The one dispatcher of these workers, created here if no process has yet."""
        if self._dispatcher is None:
            import ray

            self._dispatcher = (
                ray.remote(AttackDispatcher)
                .options(
                    name=dispatcher_name(self.worker_names),
                    get_if_exists=True,
                    num_cpus=0,  # it only waits on the workers
                    max_concurrency=1,
                )
                .remote(self.worker_names, self.role)
            )
        return self._dispatcher

    async def attack(self, batches: list[dict], *, space, config, mode: str = "attack"):
        """One result dict per batch (see :func:`saei_fast.integrations.verl.worker.run_groups`)."""
        loop = asyncio.get_running_loop()
        futures = []
        for batch in batches:
            future = loop.create_future()
            self._pending.append(((batch, space, config, mode), future))
            futures.append(future)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(self._send_after_wait())
        return list(await asyncio.gather(*futures))

    async def _send_after_wait(self) -> None:
        await asyncio.sleep(self.wait_seconds)
        pending, self._pending = self._pending, []
        # One call per (space, config, mode): in practice a single one.
        by_key: dict[tuple, list] = {}
        for item in pending:
            _, space, config, mode = item[0]
            by_key.setdefault((id(space), id(config), mode), []).append(item)
        for items in by_key.values():
            _, space, config, mode = items[0][0]
            try:
                results = await self.dispatcher().call.remote(
                    [request[0] for request, _ in items], space, config, mode
                )
            except Exception as error:
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(items, results, strict=True):
                if not future.done():
                    future.set_result(result)


def set_attack_client(client) -> None:
    """Use ``client`` (anything with an async ``attack(batches, *, space, config)``) in this
    process, e.g. a stand-in in tests; ``None`` goes back to the default."""
    global _CLIENT
    _CLIENT = client


def get_attack_client(config):
    """This process's client, built from ``config.saei._runtime`` on first use."""
    global _CLIENT
    if _CLIENT is None:
        runtime = config.saei.get("_runtime") if hasattr(config.saei, "get") else None
        if not runtime or not runtime.get("worker_names"):
            raise RuntimeError(
                "saei.perturbation=entropy needs the actor workers, which the 'saei_sync' trainer "
                "records in saei._runtime: run with trainer.v1.trainer_mode=saei_sync"
            )
        _CLIENT = RayAttackClient(list(runtime["worker_names"]), str(runtime["role"]))
    return _CLIENT
