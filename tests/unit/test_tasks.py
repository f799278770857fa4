"""LiveTask, the one lifecycle rule of logins and runs: a cancel stops the work, never the clean-up."""

from __future__ import annotations

import asyncio

from polydev.core.tasks import LiveTask, end_all


class Job(LiveTask):
    """A flow's task in miniature: works until cancelled, then cleans up (until `release`), recording both."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.cleaning = asyncio.Event()
        self.cleaned = False
        self.reason = ""

    def start(self, fail: bool = False) -> None:
        self.task = asyncio.create_task(self._run(fail))

    async def _run(self, fail: bool) -> None:
        try:
            if fail:
                raise RuntimeError("the work failed")
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.reason = "user" if self.cancelled_by_user else "shutdown"
        except RuntimeError:
            self.reason = "failed"
        finally:
            self.ending.set()
            self.cleaning.set()
            await self.release.wait()  # e.g. the VM being destroyed
            self.cleaned = True


async def test_a_cancel_stops_the_work_and_waits_for_the_clean_up() -> None:
    job = Job()
    job.start()
    await asyncio.sleep(0)
    waiter = asyncio.create_task(job.cancel_and_wait(by_user=True))
    await job.cleaning.wait()
    assert not waiter.done()  # it waits for the clean-up ...
    job.release.set()
    await waiter
    assert job.cleaned and job.reason == "user"


async def test_a_cancel_once_the_task_is_ending_does_not_cut_the_clean_up_short() -> None:
    job = Job()
    job.start(fail=True)
    await job.cleaning.wait()  # ended by itself, now cleaning up
    assert job.cancel(by_user=True) is False
    waiter = asyncio.create_task(job.cancel_and_wait(by_user=True))
    shutdown = asyncio.create_task(end_all([job]))
    await asyncio.sleep(0.05)
    assert not waiter.done() and not shutdown.done() and not job.cleaned
    job.release.set()
    await asyncio.gather(waiter, shutdown)
    assert job.cleaned and job.reason == "failed" and not job.cancelled_by_user


async def test_a_second_cancel_does_not_reach_a_task_already_cancelled() -> None:
    job = Job()
    job.start()
    await asyncio.sleep(0)
    assert job.cancel(by_user=False) is True  # the server shuts down ...
    assert job.cancel(by_user=True) is False  # ... and a user's cancel comes after: the first one stands
    await job.cleaning.wait()
    job.release.set()
    await end_all([job])
    assert job.cleaned and job.reason == "shutdown"


async def test_a_canceller_that_is_itself_cancelled_leaves_the_clean_up_running() -> None:
    job = Job()
    job.start()
    await asyncio.sleep(0)
    waiter = asyncio.create_task(job.cancel_and_wait(by_user=True))
    await job.cleaning.wait()
    waiter.cancel()  # e.g. the client of the cancel request went away
    await asyncio.sleep(0.05)
    assert job.task is not None and not job.task.done()
    job.release.set()
    await end_all([job])
    assert job.cleaned
