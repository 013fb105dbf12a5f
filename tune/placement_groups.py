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
(:func:`placement_group_recorder`) records each trial's placement group and
controller in a small registry actor, and a thread in the sweep driver removes the
placement group of every controller that died without removing it.  Delete this
module once Ray's own cleaner works without the dashboard.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group_table, remove_placement_group

from pipelines.orchestration.progress import on_driver_node


def placement_group_recorder(registry: Any, trial_id: str) -> Any:
    """A Ray Train controller callback that tells the janitor which placement group
    (and which controller) belongs to this trial.  Ray Train accepts internal
    controller callbacks in ``RunConfig.callbacks`` for workarounds like this one.

    ``registry`` is :attr:`PlacementGroupJanitor.registry`; ``None`` when this Ray has no
    Train V2 internals to hook into.
    """
    try:  # Ray Train V2's internal callback API: a Ray without it gets no janitor
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class _RecordPlacementGroup(WorkerGroupCallback):
        def __init__(self, registry, trial_id: str):
            self._registry = registry
            self._trial_id = trial_id

        def after_worker_group_start(self, worker_group) -> None:

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                controller = ray.get_runtime_context().current_actor
                ray.get(self._registry.add.remote(self._trial_id, controller, pg, _ray_cleaner_actor()), timeout=10)
            except Exception as exc:  # best effort: never fail training over bookkeeping
                print(f"[sweep] could not record the placement group of trial {self._trial_id}: {exc}")

    return _RecordPlacementGroup(registry, trial_id)


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
        """Trial id -> (Train controller, its worker-group placement group), as recorded."""

        def __init__(self) -> None:
            self._entries: list[tuple[str, Any, Any, Any]] = []

        def add(self, trial_id: str, controller, pg, ray_cleaner=None) -> None:
            self._entries.append((trial_id, controller, pg, ray_cleaner))

        def entries(self) -> list[tuple[str, Any, Any, Any]]:
            return list(self._entries)

    return TrialPlacementGroups


class PlacementGroupJanitor:
    """Removes the placement group of every Ray Train controller that died without
    removing it (a trial stopped by ASHA, or killed), so its CPUs/GPUs come back.

    Polls in a thread of the sweep driver: each recorded controller is pinged;
    a dead one (``RayActorError``) with a placement group not yet ``REMOVED``
    gets it removed.
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
        """One pass; returns how many recorded placement groups are still held."""

        pending = 0
        for trial_id, controller, pg, ray_cleaner in ray.get(self.registry.entries.remote(), timeout=30):
            key = pg.id.hex()
            if key in self._done:
                continue
            if placement_group_table(pg).get("state") == "REMOVED":
                self._done.add(key)
                continue
            ref = self._pings.get(key)
            if ref is None:
                ref = self._pings[key] = controller.__ray_ready__.remote()
            ready, _ = ray.wait([ref], timeout=0.5)
            if not ready:  # alive and busy
                pending += 1
                continue
            self._pings.pop(key, None)
            try:
                ray.get(ref)
                pending += 1  # alive
                continue
            except ray.exceptions.RayActorError:
                pass
            if placement_group_table(pg).get("state") != "REMOVED":  # Ray's cleaner may have won the race
                try:
                    remove_placement_group(pg)
                    self.released.append((trial_id, key))
                    self._log(f"[sweep] released the placement group of stopped trial {trial_id} ({key[:12]})")
                except Exception as exc:
                    self._log(f"[sweep] could not remove placement group {key[:12]} of trial {trial_id}: {exc}")
            if ray_cleaner is not None:
                try:
                    ray.kill(ray_cleaner)
                except Exception:  # already exited
                    pass
            self._done.add(key)
        return pending

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
