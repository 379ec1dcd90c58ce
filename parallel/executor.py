"""RayExecutor: tensor-parallel ranks as Ray actors, behind the ModelRunner shape.

    executor = RayExecutor(tp, runner_factory, device="auto")
    sampled = executor.submit_step(batch, sampling).result()  # SamplerOutput on the CPU
    logits = executor.execute(batch)          # [S, vocab] float32 on the CPU
    executor.shutdown()

`runner_factory(rank, group)` is called inside each actor once its process
group is up (the engine passes `functools.partial(ModelRunner, ws, meta, cfg)`).
Steps go to rank 0 over a TCP socket (step_socket.py), not as Ray calls.
The actors go into the caller's placement group when there is one (a Ray
Serve replica's), else into one this executor reserves (tp bundles,
STRICT_PACK). A rank that dies fails the step at once and marks the executor
dead: `check_health()` raises from then on.
"""
from __future__ import annotations

import os
import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import (PlacementGroup, get_current_placement_group,
                                      placement_group, remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .process_group import HANG_HINT
from .spin import STEP_SPIN_S
from .step_socket import StepClient
from .worker import RunnerFactory, TPWorker

NOSET_CUDA_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
# Before a step, the ranks' tasks are checked at most this often. A rank that dies
# between checks is still caught: rank 0 then fails the step, or hangs in it, and
# the wait for its reply checks every second.
PRE_STEP_CHECK_S = 0.5


class PlacementError(RuntimeError):
    """Ray cannot give the executor the resources its ranks need."""


class ExecutorDeadError(RuntimeError):
    """A tensor-parallel rank died or hung; the executor cannot run steps any more."""


class RemoteStep:
    """A step sent to rank 0; `result()` waits for its SamplerOutput. Steps in flight
    (async scheduling sends one before reading the last) are finished in order."""

    def __init__(self, executor: "RayExecutor", number: int) -> None:
        self._executor = executor
        self.number = number

    def result(self):
        return self._executor._step_result(self.number)


class RayExecutor:
    def __init__(self, tp: int, runner_factory: RunnerFactory, *, device: str = "auto",
                 placement_group: PlacementGroup | None = None, placement_timeout_s: float = 60,
                 startup_timeout_s: float = 600, step_timeout_s: float = 600) -> None:
        if tp < 2:
            raise ValueError(f"RayExecutor is for tp >= 2, got tp={tp}; run a ModelRunner directly")
        _ensure_ray(tp)
        self.tp = tp
        self.use_gpu = _wants_gpu(device, placement_group or get_current_placement_group())
        self.step_timeout_s = step_timeout_s
        self.device = torch.device("cpu")  # where `execute` returns the logits
        self._dead: str | None = None
        self._checked_at = 0.0  # time.monotonic() of the last check before a step
        self._loops: list[ray.ObjectRef] = []  # rank r's serving task at index r
        self._client: StepClient | None = None
        self._sent = self._answered = 0  # steps sent to rank 0, and answers read
        self._pg, self._own_pg = _placement(tp, self.use_gpu, placement_group, placement_timeout_s)
        self.workers = [_spawn(rank, tp, self.use_gpu, self._pg) for rank in range(tp)]
        try:
            info = self._start(runner_factory, startup_timeout_s)
        except BaseException:
            self._kill()
            raise
        self.num_blocks, self.block_size = info["num_blocks"], info["block_size"]
        self.vocab_size = info["vocab_size"]

    def _start(self, factory: RunnerFactory, timeout_s: float) -> dict[str, int]:
        rank0 = self.workers[0]
        addr, port = self._get([rank0.open_rendezvous.remote(timeout_s)], timeout_s, "rendezvous")[0]
        infos = self._get([w.setup.remote(addr, port, factory, timeout_s) for w in self.workers],
                          timeout_s, f"joining the group at {addr}:{port} and loading the model")
        if any(i != infos[0] for i in infos):
            raise ExecutorDeadError(f"the ranks disagree on the cache layout: {infos}")
        host, port, token = self._get([rank0.open_step_server.remote()], timeout_s,
                                      "opening the step socket")[0]
        self._loops = [rank0.serve_steps.remote(timeout_s)]
        self._loops += [w.serve.remote() for w in self.workers[1:]]
        try:
            self._client = StepClient(host, port, token, timeout_s,
                                      spin_s=STEP_SPIN_S if self.use_gpu else 0.0)
        except OSError as exc:
            raise ExecutorDeadError(f"cannot connect to rank 0's step socket at {host}:{port} "
                                    f"({exc}); {HANG_HINT}") from None
        return infos[0]

    def _get(self, refs: list[ray.ObjectRef], timeout_s: float, what: str) -> list:
        """All results, raising the first rank's error as soon as it comes."""
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = [refs.index(r) for r in pending]
                raise ExecutorDeadError(
                    f"rank(s) {ranks} did not finish {what} within {timeout_s:.0f} s: either Ray "
                    f"has no room for them (asked {self.tp} x {_bundle(self.use_gpu)}; available "
                    f"{_available()}) or the ranks cannot reach each other; {HANG_HINT}")
            ray.get(ready[0])
        return ray.get(refs)

    def execute(self, batch) -> torch.Tensor:
        """Next-token logits [S, vocab] float32 (CPU) for one ForwardBatch."""
        return self._call("execute", batch)

    def submit_step(self, batch, sampling) -> "RemoteStep":
        """One ForwardBatch run on every rank and sampled on rank 0. The batch is on its
        way to rank 0 when this returns; `.result()` waits for the SamplerOutput (CPU),
        or None when `sampling` is None."""
        self._send("step", (batch, sampling))
        self._sent += 1
        return RemoteStep(self, self._sent)

    def _step_result(self, number: int):
        if number != self._answered + 1:
            raise RuntimeError(f"step {number} finished out of order: the next answer is step "
                               f"{self._answered + 1}'s")
        self._answered += 1
        return self._wait()

    def _call(self, method: str, *args):
        """Runs rank 0's `method`; fails at once if any rank dies meanwhile."""
        if self._answered != self._sent:
            raise RuntimeError(f"{method} called with {self._sent - self._answered} step(s) "
                               "in flight; finish them first")
        self._send(method, args)
        return self._wait()

    def _send(self, method: str, args: tuple) -> None:
        now = time.monotonic()
        if now - self._checked_at >= PRE_STEP_CHECK_S:  # a Ray call: ~0.1 ms, not every step
            self._checked_at = now
            self.check_health()
        elif self._dead is not None:
            raise ExecutorDeadError(self._dead)
        self._guarded(self._client.send, method, args)

    def _wait(self):
        return self._guarded(self._client.wait, self._while_waiting)

    def _guarded(self, fn, *args):
        """fn(*args), a failure of the link or of rank 0 turned into ExecutorDeadError."""
        try:
            return fn(*args)
        except ExecutorDeadError:
            raise
        except (OSError, EOFError) as exc:  # rank 0's process is gone: let its task say why
            ready, _ = ray.wait(self._loops, num_returns=1, timeout=5)
            self._fail(self._loop_failure(ready) or f"rank 0 closed its step socket: {exc}")
        except Exception as exc:  # noqa: BLE001 - a failed step leaves the ranks out of step
            self._fail(f"rank 0 failed a step: {exc!r}")

    def _while_waiting(self, waited_s: float) -> None:
        self.check_health()
        if waited_s > self.step_timeout_s:
            self._fail(f"a step took longer than {self.step_timeout_s:.0f} s; a rank hangs")

    def check_health(self) -> None:
        """Raises ExecutorDeadError when a rank has died (now or earlier)."""
        if self._dead is None and self._loops:
            ready, _ = ray.wait(self._loops, num_returns=1, timeout=0)
            if ready:
                self._fail(self._loop_failure(ready))
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)

    def _loop_failure(self, ready: list[ray.ObjectRef]) -> str | None:
        for ref in ready:
            if ref in self._loops:
                rank = self._loops.index(ref)
                try:
                    ray.get(ref)
                    return f"rank {rank} stopped serving steps"
                except RayError as exc:
                    return f"rank {rank} died: {str(exc).splitlines()[0]}"
        return None

    def _fail(self, reason: str):
        self._dead = f"tensor-parallel executor is dead ({reason}); restart the engine"
        self._kill()
        raise ExecutorDeadError(self._dead)

    def shutdown(self) -> None:
        """Stops the ranks' loops, then ends the actors and frees their resources."""
        if self._dead is None and self.workers and self._client is not None:
            try:
                give_up = lambda waited: _give_up_after(waited, 10)  # noqa: E731
                for _ in range(self._sent - self._answered):  # answers nobody will read
                    self._drain_answer(give_up)
                self._client.call("stop", (), give_up)
                ray.wait(self._loops, num_returns=len(self._loops), timeout=10)
            except (RayError, OSError, EOFError, TimeoutError):
                pass
            self._dead = "the executor was shut down"
        self._kill()

    def _drain_answer(self, give_up) -> None:
        try:
            self._client.wait(give_up)
        except (OSError, EOFError, TimeoutError):
            raise
        except Exception:  # noqa: BLE001 - the failure of a step nobody waits for
            pass
        self._answered += 1

    def _kill(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self._own_pg and self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _give_up_after(waited_s: float, limit_s: float) -> None:
    if waited_s >= limit_s:
        raise TimeoutError(f"no answer within {limit_s:.0f} s")


def _ensure_ray(tp: int) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # a local cluster with a logical CPU per rank even on small machines
        ray.init(num_cpus=max(os.cpu_count() or 1, tp + 1), include_dashboard=False)


def _wants_gpu(device: str, pg: PlacementGroup | None) -> bool:
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    if pg is not None:
        return any(b.get("GPU", 0) > 0 for b in pg.bundle_specs)
    return ray.cluster_resources().get("GPU", 0) >= 1


def _bundle(use_gpu: bool) -> dict[str, float]:
    return {"GPU": 1} if use_gpu else {"CPU": 1}


def _available() -> dict[str, float]:
    return {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}


def _placement(tp: int, use_gpu: bool, given: PlacementGroup | None,
               timeout_s: float) -> tuple[PlacementGroup, bool]:
    """(placement group, whether this executor created it)."""
    pg = given or get_current_placement_group()
    if pg is not None:
        return pg, False
    pg = placement_group([_bundle(use_gpu)] * tp, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"Ray could not reserve {tp} x {_bundle(use_gpu)} on one node within "
            f"{timeout_s:.0f} s (available now: {_available()}); lower --tp, free the resources, "
            f"or add a node with {tp} {'GPUs' if use_gpu else 'CPUs'}") from None
    return pg, True


def _spawn(rank: int, tp: int, use_gpu: bool, pg: PlacementGroup):
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    resources = {"num_gpus": 1, "num_cpus": 0} if use_gpu else {"num_cpus": 1}
    if use_gpu:  # every rank sees the node's GPUs (see worker.local_gpu_index)
        resources["runtime_env"] = {"env_vars": {NOSET_CUDA_VISIBLE: "1"}}
    actor = ray.remote(TPWorker).options(scheduling_strategy=strategy, max_restarts=0,
                                         **resources)
    return actor.remote(rank, tp, use_gpu)
