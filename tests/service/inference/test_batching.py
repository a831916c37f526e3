"""The dynamic batcher and the forward pass behind it: coalescing, bounded queue, deadlines,
batching off, and seeded sampling that does not depend on batching (unit level and with concurrent
requests to a real server)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

import nfcore
from service.client import AsyncClient, Client
from service.errors import Overloaded
from service.inference import Batcher, BatcherConfig, Pending, forward

from ..conftest import TINY, Server, write_model


@pytest.fixture
def flow() -> nfcore.Flow:
    torch.manual_seed(0)
    return nfcore.build(TINY)


def batcher_of(flow: nfcore.Flow, config: BatcherConfig) -> tuple[Batcher, threading.Lock]:
    """A batcher in front of ``flow``'s forward pass, as the model cache builds it, and its device
    lock (hold it to keep every pass waiting)."""
    lock = threading.Lock()
    return Batcher(forward(flow, config.max_batch_rows), "t:1", config, device_lock=lock), lock


def make_job(kind: str, rows: int, *, x=None, seed=None, deadline_s: float = 30.0) -> Pending:
    loop = asyncio.get_running_loop()
    return Pending(kind=kind, rows=rows, future=loop.create_future(), loop=loop,
               deadline=time.monotonic() + deadline_s, x=x, seed=seed)


async def taken(batcher: Batcher, first: Pending) -> Pending:
    """Submit ``first`` and wait until the thread took it (and waits for the held device lock)."""
    batcher.submit(first)
    while batcher.queued_rows:
        await asyncio.sleep(0.001)
    return first


def run_held(batcher: Batcher, lock: threading.Lock, jobs: list[Pending]) -> None:
    """Submit every job while the device lock is held, so none can run before all are queued."""
    for job in jobs:
        batcher.submit(job)


async def gather(jobs: list[Pending]) -> list:
    return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)


def test_batcher_coalesces_queued_requests_into_one_pass(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(max_queue_delay_s=0.0))
    xs = [np.random.default_rng(i).normal(size=(i + 1, 2)).astype(np.float32) for i in range(8)]

    async def main() -> list:
        # Hold the lock through a first (blocking) job so the other 8 queue up behind it.
        with lock:
            first = await taken(batcher, make_job("log_prob", 1, x=np.zeros((1, 2), np.float32)))
            jobs = [make_job("log_prob", len(x), x=x) for x in xs]
            run_held(batcher, lock, jobs)
        return await gather([first, *jobs])

    results = asyncio.run(main())
    batcher.close()
    assert batcher.batches == 2  # the first job, then all 8 together
    for x, got in zip(xs, results[1:], strict=True):
        with torch.inference_mode():
            want = flow.log_prob(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_batching_off_runs_one_pass_per_request(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(batching=False))

    async def main() -> list:
        with lock:
            jobs = [make_job("sample", 3, seed=i) for i in range(5)]
            run_held(batcher, lock, jobs)
        return await gather(jobs)

    results = asyncio.run(main())
    batcher.close()
    assert batcher.batches == 5
    assert all(isinstance(r, tuple) for r in results)


def test_batcher_keeps_kinds_apart(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(max_queue_delay_s=0.0))

    async def main() -> list:
        with lock:
            first = await taken(batcher, make_job("sample", 1, seed=0))
            jobs = [make_job("log_prob", 2, x=np.zeros((2, 2), np.float32)),
                    make_job("sample", 4, seed=1), make_job("log_prob", 3,
                                                            x=np.ones((3, 2), np.float32))]
            run_held(batcher, lock, jobs)
        return await gather([first, *jobs])

    results = asyncio.run(main())
    batcher.close()
    assert batcher.batches == 3  # first sample; both log_probs together; the second sample
    assert results[1].shape == (2,) and results[3].shape == (3,)
    assert results[2][0].shape == (4, 2)


def test_seeded_samples_do_not_depend_on_batching(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(max_queue_delay_s=0.0))
    seeds = [11, 12, 13, 14]

    async def main() -> list:
        with lock:
            jobs = [make_job("sample", 5 + s, seed=s) for s in seeds]
            run_held(batcher, lock, jobs)
        return await gather(jobs)

    results = asyncio.run(main())
    batcher.close()
    assert batcher.batches <= 2  # at most the first alone, then the rest together
    for s, (x, lq) in zip(seeds, results, strict=True):
        with torch.inference_mode():
            want_x, want_lq = flow.sample_and_log_prob(5 + s,
                                                       generator=torch.Generator().manual_seed(s))
        np.testing.assert_allclose(x, want_x.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lq, want_lq.numpy(), rtol=1e-6, atol=1e-6)


def test_only_a_request_to_an_idle_model_skips_the_queue_delay(flow: nfcore.Flow) -> None:
    # A queue delay of an hour: a request that finds its model idle runs at once; one that comes
    # while another is unanswered waits for its batch to fill, as before.
    batcher, lock = batcher_of(flow, BatcherConfig(max_queue_delay_s=3600.0))

    async def main() -> None:
        lone = make_job("sample", 2, seed=0)
        batcher.submit(lone)
        await asyncio.wait_for(lone.future, 60)
        with lock:
            first = await taken(batcher, make_job("sample", 1, seed=1))
            second = make_job("sample", 1, seed=2)
            batcher.submit(second)
        await asyncio.wait_for(first.future, 60)
        await asyncio.sleep(0.2)
        assert (lone.alone, first.alone, second.alone) == (True, True, False)
        assert not second.future.done() and batcher.queued_rows == 1  # waiting for company
        await asyncio.to_thread(batcher.close)  # closing runs what is queued
        assert isinstance(await asyncio.wait_for(second.future, 60), tuple)

    asyncio.run(main())
    assert batcher.batches == 3

    # run_idle_at_once=False: even a lone request waits the delay (Triton's behaviour).
    strict, _ = batcher_of(flow, BatcherConfig(max_queue_delay_s=3600.0, run_idle_at_once=False))

    async def lone_waits() -> None:
        job = make_job("sample", 2, seed=0)
        strict.submit(job)
        await asyncio.sleep(0.2)
        assert not job.alone and not job.future.done()
        await asyncio.to_thread(strict.close)
        assert isinstance(await asyncio.wait_for(job.future, 60), tuple)

    asyncio.run(lone_waits())


def test_full_queue_fails_fast_with_overloaded(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(max_queued_rows=10))

    async def main() -> None:
        with lock:
            await taken(batcher, make_job("sample", 1, seed=0))
            batcher.submit(make_job("sample", 6, seed=1))
            with pytest.raises(Overloaded, match="6 rows already queued \\(limit 10\\)"):
                batcher.submit(make_job("sample", 5, seed=2))
            batcher.submit(make_job("sample", 4, seed=3))  # still fits

    asyncio.run(main())
    batcher.close()


def test_request_past_its_deadline_gets_overloaded(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig())

    async def main() -> list:
        with lock:
            jobs = [make_job("sample", 2, seed=1, deadline_s=-1.0),
                    make_job("sample", 2, seed=2)]
            run_held(batcher, lock, jobs)
        return await gather(jobs)

    expired, fine = asyncio.run(main())
    batcher.close()
    assert isinstance(expired, Overloaded) and "past its deadline" in str(expired)
    assert isinstance(fine, tuple)


def test_large_request_runs_in_chunks_of_max_batch_rows(flow: nfcore.Flow) -> None:
    batcher, _ = batcher_of(flow, BatcherConfig(max_batch_rows=100))
    x = np.random.default_rng(0).normal(size=(1050, 2)).astype(np.float32)

    async def main():
        job = make_job("log_prob", len(x), x=x)
        batcher.submit(job)
        return await job.future

    got = asyncio.run(main())
    batcher.close()
    with torch.inference_mode():
        want = flow.log_prob(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- over HTTP
def batch_counts(text: str, model: str) -> tuple[float, float]:
    """(passes, requests) of sample batches of ``model`` from /metrics."""
    passes = requests = 0.0
    for line in text.splitlines():
        if line.startswith("nfserve_batch_requests_count") and f'model="{model}"' in line \
                and 'kind="sample"' in line:
            passes = float(line.split()[-1])
        if line.startswith("nfserve_batch_requests_sum") and f'model="{model}"' in line \
                and 'kind="sample"' in line:
            requests = float(line.split()[-1])
    return passes, requests


def test_concurrent_seeded_samples_equal_sequential_ones(server: Server, client: Client) -> None:
    seeds = list(range(100, 124))
    sequential = {s: client.sample("tiny3", 10 + s % 7, seed=s) for s in seeds}
    # A slow pass of another model holds the device while the samples queue up behind it, so
    # they are batched even when the machine is too busy to send them within the queue delay.
    write_model(server.models_dir, "slow", {"preset": "planar", "dim": 2, "transforms": 64})
    slow_x = np.random.default_rng(0).normal(size=(5000, 2))
    client.log_prob("slow", slow_x[:10])  # loaded
    before = batch_counts(client.metrics(), "tiny3:1")

    async def concurrent():
        async with AsyncClient(server.url) as ac:
            slow = asyncio.ensure_future(ac.log_prob("slow", slow_x, binary=True))
            await asyncio.sleep(0)
            results = await asyncio.gather(*(ac.sample("tiny3", 10 + s % 7, seed=s)
                                              for s in seeds))
            await slow
            return results

    results = asyncio.run(concurrent())
    after = batch_counts(client.metrics(), "tiny3:1")
    passes, requests = after[0] - before[0], after[1] - before[1]
    assert requests == len(seeds)
    assert passes < len(seeds)  # some requests really shared a forward pass
    for s, (x, lq) in zip(seeds, results, strict=True):
        np.testing.assert_allclose(x, sequential[s][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(lq, sequential[s][1], rtol=1e-6, atol=1e-6)


def test_a_failing_request_does_not_fail_its_batch_mates(flow: nfcore.Flow) -> None:
    batcher, lock = batcher_of(flow, BatcherConfig(max_queue_delay_s=0.0))

    async def main() -> list:
        with lock:
            first = await taken(batcher, make_job("log_prob", 1, x=np.zeros((1, 2), np.float32)))
            good = make_job("log_prob", 2, x=np.zeros((2, 2), np.float32))
            bad = make_job("log_prob", 2, x=np.zeros((2, 3), np.float32))  # slipped past checks
            run_held(batcher, lock, [good, bad])
        return await gather([first, good, bad])

    _, good, bad = asyncio.run(main())
    batcher.close()
    assert isinstance(good, np.ndarray) and good.shape == (2,)
    assert isinstance(bad, Exception)


def test_the_batcher_knows_nothing_of_models() -> None:
    """Any function of a batch will do: the flow's pass is only what the model cache gives it."""
    passes: list[list[int]] = []

    def run(batch: list[Pending]) -> list[int]:
        passes.append([p.rows for p in batch])
        return [10 * p.rows for p in batch]

    lock = threading.Lock()
    batcher = Batcher(run, "plain", BatcherConfig(max_queue_delay_s=0.0), device_lock=lock)

    async def main() -> list:
        with lock:  # all three queue up before the thread may run a pass
            jobs = [make_job("log_prob", rows) for rows in (1, 2, 3)]
            run_held(batcher, lock, jobs)
        return await gather(jobs)

    results = asyncio.run(main())
    batcher.close()
    assert results == [10, 20, 30]
    assert sorted(r for batch in passes for r in batch) == [1, 2, 3] and len(passes) <= 2
