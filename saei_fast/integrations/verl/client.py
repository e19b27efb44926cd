"""How an agent loop reaches the actor's ``saei_attack`` worker method.

Agent loops run in verl's agent-loop worker processes, apart from the trainer that holds the
actor worker group. The SaEI trainer writes the actor workers' Ray names and role into
``config.saei._runtime`` before the agent-loop workers are created (they receive the
config). Every process then sends its requests to one Ray actor, :class:`AttackDispatcher`
(named after the workers, created by whichever process asks first), which re-attaches to
the workers with verl's ``RayWorkerGroup.from_detached`` and calls the method with its
registered dispatch, one call at a time.

One caller, one call at a time, because the method runs FSDP collectives: two calls in
flight at once (from two agent-loop processes, or two threads of one) can reach the ranks
in different orders, and the ranks then wait on each other's all-gathers for ever.

Within a process, :class:`RayAttackClient` runs one sender task while requests are waiting:
it collects the requests that arrive within ``wait_seconds``, sends them, and looks again
before it stops, so a request that arrives while a call is in flight goes out with the next
call (it never waits for a wake-up that does not come). Requests whose pixel space,
:class:`~saei_fast.AttackConfig` and mode are equal (by value: every agent loop builds its
own objects) share a call. A call is padded to a multiple of the worker count with groups
marked ``saei_pad``, which the ranks skip (see :mod:`.worker`), so no rank recomputes
another's group. A call that fails fails every request in it, with the error; a call that
does not return within ``saei.attack_timeout_s`` seconds fails them with a message naming
that setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

_CLIENT = None
DEFAULT_TIMEOUT_S = 1800.0


def pad_groups(groups: list[dict], world_size: int) -> list[dict]:
    """``groups`` and, after them, as many padding groups as make the count a multiple of
    ``world_size`` (verl's dispatch gives every rank an equal, contiguous share)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not groups:
        raise ValueError("a call needs at least one group")
    padding = {**groups[-1], "saei_pad": True}
    return groups + [padding] * (-len(groups) % world_size)


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
        padded = pad_groups(groups, group.world_size)
        column = np.empty(len(padded), dtype=object)
        column[:] = padded
        data = DataProto.from_dict(
            non_tensors={"saei_group": column},
            meta_info={"saei_space": space, "saei_config": config, "saei_mode": mode},
        )
        self.calls += 1
        output = group.saei_attack(data)
        return list(output.non_tensor_batch["saei_result"])[: len(groups)]

    def num_calls(self) -> int:
        return self.calls


def dispatcher_name(worker_names: Sequence[str]) -> str:
    return f"saei-attack-dispatcher:{worker_names[0]}"


def settings_key(space, config, mode: str) -> tuple:
    """Equal for requests that can share a call: same kind of pixel space with the same
    constants, equal configs (a frozen dataclass compares by value), same mode."""
    constants = tuple(sorted((name, repr(value)) for name, value in vars(space).items()))
    return (type(space).__module__, type(space).__qualname__, constants, config, mode)


class RayAttackClient:
    """Batches the attack requests of one process and sends them to the shared dispatcher.

    Args:
        worker_names, role: the actor workers (``config.saei._runtime``).
        wait_seconds: how long the sender collects requests before a call.
        timeout_s: how long a call may take (``saei.attack_timeout_s``).
        dispatcher: the dispatcher's handle (default: the named Ray actor of these workers).
    """

    def __init__(
        self,
        worker_names: Sequence[str],
        role: str,
        *,
        wait_seconds: float = 0.05,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        dispatcher=None,
    ) -> None:
        if not worker_names:
            raise ValueError("worker_names must name the actor workers, got none")
        if not timeout_s > 0:
            raise ValueError(f"saei.attack_timeout_s must be > 0, got {timeout_s!r}")
        self.worker_names, self.role = list(worker_names), role
        self.wait_seconds, self.timeout_s = wait_seconds, float(timeout_s)
        self._dispatcher = dispatcher
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None
        self.calls = 0

    def dispatcher(self):
        """The one dispatcher of these workers, created here if no process has yet.

        Detached: a non-detached actor dies with the handles of the process that created it,
        and the handles other processes get by name do not keep it alive, so the first agent
        loop process to drop its client would fail every other process's calls. The dispatcher
        holds no resources (no CPU, no state but the workers' handles) and is named after this
        worker group, so it ends with the Ray cluster and never meets another run's workers.
        """
        if self._dispatcher is None:
            import ray

            self._dispatcher = (
                ray.remote(AttackDispatcher)
                .options(
                    name=dispatcher_name(self.worker_names),
                    get_if_exists=True,
                    lifetime="detached",
                    num_cpus=0,  # it only waits on the workers
                    max_concurrency=1,
                )
                .remote(self.worker_names, self.role)
            )
        return self._dispatcher

    async def attack(self, batches: list[dict], *, space, config, mode: str = "attack"):
        """One result dict per batch (see :func:`saei_fast.integrations.verl.worker.run_groups`)."""
        loop = asyncio.get_running_loop()
        key = settings_key(space, config, mode)
        futures = []
        for batch in batches:
            future = loop.create_future()
            self._pending.append(((key, batch, space, config, mode), future))
            futures.append(future)
        # No await between the check and the start: the sender cannot stop in between.
        if self._sender is None or self._sender.done() or self._sender.get_loop() is not loop:
            self._sender = loop.create_task(self._send_while_pending())
        return list(await asyncio.gather(*futures))

    async def _send_while_pending(self) -> None:
        taken: list = []
        try:
            while self._pending:
                await asyncio.sleep(self.wait_seconds)
                taken, self._pending = self._pending, []
                by_key: dict[tuple, list] = {}
                for item in taken:
                    by_key.setdefault(item[0][0], []).append(item)
                for items in by_key.values():
                    await self._send(items)
            # Returning with nothing pending and no await after the check: a request that
            # arrives from here on finds this task done and starts a new one.
        except BaseException as error:  # cancelled, or a bug: no request may be left waiting
            _fail(taken + self._pending, error)
            self._pending = []
            raise

    async def _send(self, items: list) -> None:
        _, _, space, config, mode = items[0][0]
        groups = [request[1] for request, _ in items]
        self.calls += 1
        try:
            results = await asyncio.wait_for(
                self._remote_call(groups, space, config, mode), timeout=self.timeout_s
            )
            if len(results) != len(items):
                raise RuntimeError(f"the actor returned {len(results)} results for {len(items)}")
        except asyncio.TimeoutError:
            error = TimeoutError(
                f"the SaEI attack call of {len(items)} group(s) on the actor workers did not "
                f"return within saei.attack_timeout_s={self.timeout_s:g} seconds (a rank may "
                "have failed or be stuck in a collective); raise the setting for slow attacks"
            )
            _fail(items, error)
            return
        except Exception as error:
            _fail(
                items,
                RuntimeError(
                    f"the SaEI attack call of {len(items)} group(s) on the actor workers "
                    f"failed: {type(error).__name__}: {error}"
                ),
            )
            return
        for (_, future), result in zip(items, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _remote_call(self, groups, space, config, mode):
        return await self.dispatcher().call.remote(groups, space, config, mode)


def _fail(items: list, error: BaseException) -> None:
    for _, future in items:
        if not future.done():
            future.set_exception(error)


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
                "saei.perturbation=entropy needs the actor workers, which the SaEI trainer "
                "records in saei._runtime: run with trainer.v1.trainer_mode=saei_sync "
                "(verl's sync trainer with the SaEI actor worker)"
            )
        timeout = config.saei.get("attack_timeout_s") if hasattr(config.saei, "get") else None
        _CLIENT = RayAttackClient(
            list(runtime["worker_names"]),
            str(runtime["role"]),
            timeout_s=DEFAULT_TIMEOUT_S if timeout is None else float(timeout),
        )
    return _CLIENT
