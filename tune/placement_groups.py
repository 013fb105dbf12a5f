"""Workaround: give back the placement groups of Ray Train V2 trials that Tune stopped early.

When ASHA stops a trial, Tune kills the trial's driver and with it the Ray Train V2
controller; the worker group's placement group is owned by the job, not the
controller, so it stays reserved and the next trial waits for CPUs forever
(ray-project/ray#54305, "[Ray Tune + Train V2] Broken resource sharing among Tune
trials").  Ray's fix (ray-project/ray#58515) starts a detached
``PlacementGroupCleaner`` per controller, but that cleaner asks the Ray state API
whether its controller is alive, and the state API is served by the dashboard, which
the local cluster ``ift`` starts (``include_dashboard=False``) does not run: the
cleaner logs "Failed to query Ray Train Controller actor state" every second and never
removes anything.  Checked on Ray 2.60 (two Train V2 trials stopped by Tune, no janitor):
without the dashboard both placement groups were still ``CREATED`` 100 s after
``Tuner.fit`` returned, every CPU held; with ``include_dashboard=True`` Ray's cleaner had
removed them within 10 s.

So a sweep runs a :class:`PlacementGroupJanitor`: a controller callback
(:func:`placement_group_recorder`) records each trial's controller in a small registry
actor before its worker group starts, and a thread in the sweep driver removes every
placement group a dead controller created and left behind.  Keyed by the controller,
not by a recorded placement group: a trial stopped while its worker group was starting
has created a placement group it never got to report (seen once in a 4-trial sweep).
Delete this module once Ray's own cleaner works without the dashboard.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import PlacementGroupID
from ray.util.placement_group import PlacementGroup, remove_placement_group

from pipelines.orchestration.progress import on_driver_node


def placement_group_recorder(registry: Any, trial_id: str) -> Any:
    """A Ray Train controller callback that tells the janitor which controller runs this trial,
    before each worker group starts (so before the group's placement group exists).  Ray Train
    accepts internal controller callbacks in ``RunConfig.callbacks`` for workarounds like this one.

    ``registry`` is :attr:`PlacementGroupJanitor.registry`; ``None`` when this Ray has no
    Train V2 internals to hook into.
    """
    try:  # Ray Train V2's internal callback API: a Ray without it gets no janitor
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class _RecordController(WorkerGroupCallback):
        def __init__(self, registry, trial_id: str):
            self._registry = registry
            self._trial_id = trial_id

        def before_worker_group_start(self, worker_group_context) -> None:
            try:
                context = ray.get_runtime_context()
                ray.get(
                    self._registry.add.remote(
                        self._trial_id, context.current_actor, context.get_actor_id(), _ray_cleaner_actor()
                    ),
                    timeout=10,
                )
            except Exception as exc:  # best effort: never fail training over bookkeeping
                print(f"[sweep] could not record the Ray Train controller of trial {self._trial_id}: {exc}")

    return _RecordController(registry, trial_id)


def live_placement_groups_by_creator() -> dict[str, list[str]]:
    """Actor id (hex) -> the placement groups (hex ids) it created that are not removed yet.

    Read from the GCS's own table: :func:`ray.util.placement_group.placement_group_table` leaves
    out who created a group.  A group created by an actor outlives it (it belongs to the job).
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    out: dict[str, list[str]] = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if data.state != gcs_pb2.PlacementGroupTableData.REMOVED and data.creator_actor_id:
            out.setdefault(data.creator_actor_id.hex(), []).append(data.placement_group_id.hex())
    return out


def _ray_cleaner_actor():
    """The detached ``PlacementGroupCleaner`` Ray Train started for this controller, if any.

    Runs inside the controller process, whose one ``PlacementGroupCleanerCallback``
    holds the handle.  Without the state API (a local cluster without the
    dashboard) that cleaner can never tell that its controller died: it polls
    and logs a warning every second for the life of the cluster.  The janitor
    stops it once it has released the placement group in its stead.
    """

    for obj in gc.get_objects():
        if type(obj).__name__ == "PlacementGroupCleanerCallback":
            return getattr(obj, "_cleaner", None)
    return None


def _registry_cls() -> Any:

    @ray.remote(num_cpus=0)
    class TrialPlacementGroups:
        """The Train controllers of the sweep's trials: (trial id, controller, its actor id, Ray's cleaner)."""

        def __init__(self) -> None:
            self._entries: dict[str, tuple[str, Any, str, Any]] = {}

        def add(self, trial_id: str, controller, controller_id: str, ray_cleaner=None) -> None:
            self._entries.setdefault(controller_id, (trial_id, controller, controller_id, ray_cleaner))

        def entries(self) -> list[tuple[str, Any, str, Any]]:
            return list(self._entries.values())

    return TrialPlacementGroups


class PlacementGroupJanitor:
    """Removes the placement groups every Ray Train controller of the sweep left when it died
    (a trial stopped by ASHA, or killed), so their CPUs/GPUs come back.

    Polls in a thread of the sweep driver: each recorded controller that still holds a placement
    group is pinged; once it is dead (``RayActorError``), every group it created and nobody
    removed is removed.
    """

    def __init__(self, interval_s: float = 1.0, log: Callable[[str], None] | None = None):

        # Trials get this actor's handle (it pickles; the janitor's thread does not).  On the driver's
        # node: on a worker node that is lost it would take the sweep's records with it.
        self.registry = _registry_cls().options(scheduling_strategy=on_driver_node()).remote()
        self.interval_s = interval_s
        self.released: list[tuple[str, str]] = []  # (trial id, placement group id)
        self._done: set[str] = set()
        self._pings: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-pg-janitor", daemon=True)
        self._log = log or (lambda msg: print(msg, flush=True))

    def start(self) -> None:
        """Start polling (Ray must be up)."""
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # keep watching; a failed poll is retried
                self._log(f"[sweep] placement group check failed: {exc}")

    def check(self) -> int:
        """One pass; returns how many recorded controllers are alive and still hold a placement group."""

        held = live_placement_groups_by_creator()
        pending = 0
        for trial_id, controller, controller_id, ray_cleaner in ray.get(self.registry.entries.remote(), timeout=30):
            if controller_id in self._done:
                continue
            ref = self._pings.get(controller_id)
            if ref is None:
                ref = self._pings[controller_id] = controller.__ray_ready__.remote()
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                self._pings.pop(controller_id, None)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:  # dead: what it still holds is left over
                    self._release(trial_id, held.get(controller_id, []), ray_cleaner)
                    self._done.add(controller_id)
                    continue
            pending += bool(held.get(controller_id))  # alive (or busy): its groups are its own
        return pending

    def _release(self, trial_id: str, placement_groups: list[str], ray_cleaner: Any) -> None:
        for key in placement_groups:
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(key))))
                self.released.append((trial_id, key))
                self._log(f"[sweep] released the placement group of stopped trial {trial_id} ({key[:12]})")
            except Exception as exc:  # Ray's cleaner, or the controller's own shutdown, may have won the race
                self._log(f"[sweep] could not remove placement group {key[:12]} of trial {trial_id}: {exc}")
        if ray_cleaner is not None:
            try:
                ray.kill(ray_cleaner)
            except Exception:  # already exited
                pass

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop polling after a last pass that waits for every recorded controller to end,
        then end the registry actor."""

        self._stop.set()
        self._thread.join(timeout=10)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.check() == 0:
                    return
                time.sleep(self.interval_s)
            self._log("[sweep] some Ray Train controllers were still alive when the sweep ended")
        finally:
            ray.kill(self.registry)
