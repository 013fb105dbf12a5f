"""Stopped trials give their placement groups back (the janitor of tune.placement_groups)."""

from __future__ import annotations

import time

import pytest
import ray

from tune.placement_groups import PlacementGroupJanitor
from tune.results import STOPPED

# The package-scoped sweep is built inside the first test's setup: about 4 minutes on an
# idle 2-core box, but up to 10 when the box is shared; give it room.
pytestmark = pytest.mark.timeout(1800)


@pytest.mark.slow
def test_stopped_trials_give_their_placement_groups_back(sweep4):
    """A trial stopped by ASHA kills its Ray Train controller; its worker placement group
    must still be removed so its CPUs come back (Ray Train V2 leaks it without the janitor)."""
    from ray.util import placement_group_table

    deadline = time.time() + 60
    while True:
        held = {k: v["state"] for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
        cpus = ray.available_resources().get("CPU", 0.0)
        if not held and cpus >= ray.cluster_resources()["CPU"] - 1e-6:
            break
        assert time.time() < deadline, f"placement groups still held: {held}, CPUs free {cpus}"
        time.sleep(1)
    # On this dashboard-less local cluster Ray's own cleaner cannot see the controller die:
    # the sweep's janitor released every stopped trial's placement group.
    n_stopped = sum(r["status"] == STOPPED for r in sweep4.rows)
    assert len(sweep4.released_placement_groups) >= n_stopped


@pytest.mark.slow
def test_the_janitor_removes_only_the_placement_groups_of_dead_controllers(ray_cluster):
    """The janitor on its own: a placement group made by an actor outlives the actor (it
    belongs to the job), as a Train controller's does; the janitor removes it once the
    actor is dead and leaves a live one's alone."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:
        def placement_group(self):
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready(), timeout=60)
            return pg, ray.get_runtime_context().get_actor_id()

    lines: list[str] = []
    janitor = PlacementGroupJanitor(interval_s=0.2, log=lines.append)
    alive, dead = Controller.remote(), Controller.remote()
    made = {name: ray.get(c.placement_group.remote(), timeout=120) for name, c in (("alive", alive), ("dead", dead))}
    pgs = {name: pg for name, (pg, _) in made.items()}
    try:
        for name, c in (("alive", alive), ("dead", dead)):  # as the recorder does, before the group exists
            ray.get(janitor.registry.add.remote(name, c, made[name][1]), timeout=30)
        janitor.start()
        ray.kill(dead)
        deadline = time.time() + 60
        while placement_group_table(pgs["dead"])["state"] != "REMOVED":
            assert time.time() < deadline, lines
            time.sleep(0.2)
        assert placement_group_table(pgs["alive"])["state"] == "CREATED"
        assert [t for t, _ in janitor.released] == ["dead"]
        ray.kill(alive)
        janitor.stop(timeout_s=60)
        assert [t for t, _ in janitor.released] == ["dead", "alive"]
        assert any("released the placement group of stopped trial dead" in line for line in lines)
    finally:
        for pg in pgs.values():  # never leave CPUs reserved for the other tests of this package
            if placement_group_table(pg)["state"] != "REMOVED":
                remove_placement_group(pg)
