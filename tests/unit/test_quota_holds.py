"""An admitted request's hold, against a check's database read: counted until the rows count it, and never
both the hold and its VM's row, whichever order the read and the row's write came in."""

from __future__ import annotations

import time
import uuid

from polydev.core.quotas import Hold


def test_a_hold_counts_until_a_read_can_see_its_vm_and_never_beside_the_row() -> None:
    book: list[Hold] = []
    hold = Hold(uuid.uuid4(), {"vcpus": 1}, book)
    book.append(hold)
    vm = uuid.uuid4()
    before = time.monotonic()
    assert hold.counts(frozenset(), before)  # no row yet: only the hold says it
    hold.at_row(vm)
    after = time.monotonic()
    assert hold.counts(frozenset(), before)  # a read begun before the row may have missed it: the hold stands
    assert not hold.counts(frozenset({vm}), before)  # that read saw the row: not twice
    assert not hold.counts(frozenset(), after)  # a read begun after the row sees it (or its VM has ended)
    hold.release()
    assert book == []
    hold.release()  # idempotent
