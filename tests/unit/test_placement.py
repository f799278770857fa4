"""Placement (core/placement.py): the server that could take the most more VMs of the size, this one on a tie,
none when none fits."""

from __future__ import annotations

import uuid

from polydev.core.placement import choose, room
from polydev.store.servers import Load

ME, OTHER, THIRD = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def load(server_id: uuid.UUID, used_vcpus: int, used_memory_mb: int, vcpus: int = 8, memory_mb: int = 8192) -> Load:
    return Load(server_id, f"http://{server_id}", vcpus, memory_mb, used_vcpus, used_memory_mb)


def test_the_roomiest_server_that_fits_is_chosen() -> None:
    loads = [load(ME, 6, 6144), load(OTHER, 2, 2048), load(THIRD, 4, 1024)]
    assert [room(x, 1, 1024) for x in loads] == [2, 6, 4]
    assert choose(loads, ME, 1, 1024).server_id == OTHER  # type: ignore[union-attr]


def test_this_server_keeps_the_request_when_it_is_as_roomy_as_any() -> None:
    loads = [load(OTHER, 2, 2048), load(ME, 2, 2048)]
    assert choose(loads, ME, 1, 1024).server_id == ME  # type: ignore[union-attr]


def test_the_scarcer_resource_decides_and_a_server_that_cannot_fit_is_never_chosen() -> None:
    # OTHER has memory to spare but no vCPU left; THIRD has vCPUs to spare but memory for two more only.
    loads = [load(ME, 7, 7168), load(OTHER, 8, 0), load(THIRD, 0, 6144)]
    assert [room(x, 1, 1024) for x in loads] == [1, 0, 2]
    assert choose(loads, ME, 1, 1024).server_id == THIRD  # type: ignore[union-attr]
    assert choose(loads, ME, 2, 4096) is None, "nobody fits: the caller's own admission refuses"


def test_a_bigger_host_takes_more_of_the_work() -> None:
    big, small = load(OTHER, 16, 16384, vcpus=64, memory_mb=65536), load(ME, 0, 0, vcpus=4, memory_mb=4096)
    assert choose([small, big], ME, 1, 1024).server_id == OTHER  # type: ignore[union-attr]
