"""The asyncio twin of `TrainingClient`, with the same methods:

async with AsyncTrainingClient("localhost:50051") as client:
    job = await client.submit("examples/mnist_mlp.yaml")
    async for event in job.stream():
        ...
    info = await job.wait()

The operations themselves (requests, decoding, retries, resuming) are `stepstream.protocol`'s;
this module only awaits what they ask for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stepstream import protocol
from stepstream.connection import Connection, Credentials
from stepstream.kernel.events import Event
from stepstream.kernel.states import JobState
from stepstream.protocol import ClientSurface, JobHandle, JobInfo, Metrics, Program, Run
from stepstream.v1 import trainer_pb2 as pb

T = TypeVar("T")


class AsyncJob(JobHandle):
    """Like `stepstream.client.Job`; every method is a coroutine, `stream` an async iterator
    and `state` an awaitable (`await job.state`)."""

    client: AsyncTrainingClient

    async def info(self) -> JobInfo:
        return await self.client._run(self._ops.get(self.name))

    @property
    def state(self) -> Awaitable[JobState]:
        async def state_now() -> JobState:
            return (await self.info()).state

        return state_now()

    def stream(self, after_seq: int = 0, *, retry_seconds: float = 60.0) -> AsyncIterator[Event]:
        return self.client._iterate(self._ops.watch(self.name, after_seq, retry_seconds))

    async def wait(self, timeout: float | None = None) -> JobInfo:
        return await self.client._run(self._ops.wait(self.name, timeout))

    async def cancel(self) -> JobInfo:
        return await self.client._run(self._ops.cancel(self.name))

    async def metrics(self, max_points: int = 0) -> Metrics:
        return await self.client._run(self._ops.metrics(self.name, max_points))

    async def download_model(self, path: str | Path, format: str = "keras") -> Path:
        return await self.client._run(self._ops.download_model(self.name, path, format))

    async def download_tensorboard(self, path: str | Path) -> Path:
        return await self.client._run(self._ops.download_artifacts(self.name, path, "tensorboard"))


class AsyncTrainingClient(Connection, ClientSurface[Awaitable[AsyncJob], AsyncIterator[JobInfo]]):
    """Like `stepstream.client.TrainingClient`, over a grpc.aio channel."""

    def _connect(self, credentials: Credentials) -> grpc.aio.Channel:
        return credentials.aio_channel(self.address)

    async def __aenter__(self) -> AsyncTrainingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def job(self, name: str) -> AsyncJob:
        return AsyncJob(self, name)

    async def capabilities(self) -> dict[str, Any]:
        return await self._run(self._ops.capabilities())

    async def upload_dataset(self, name: str, path: str | Path, chunk_size: int = 1 << 20) -> str:
        return await self._run(self._ops.upload_dataset(name, path, chunk_size))

    async def upload(
        self,
        path: str | Path,
        name: str | None = None,
        chunk_size: int = 1 << 20,
        progress: Callable[[int, int], None] | None = None,
    ) -> pb.Dataset:
        return await self._run(self._ops.upload(path, name, chunk_size, progress))

    # The shell: perform what a program asks, awaiting.

    async def _submit(self, request: pb.CreateJobRequest) -> AsyncJob:
        return AsyncJob(self, await self._run(self._ops.submit(request)))

    async def _run(self, program: Program[T]) -> T:
        run = Run(program, self._explain)
        async for _ in self._steps(run):
            raise TypeError("a program run for its result emitted a value")
        return run.result  # type: ignore[return-value]

    def _iterate(self, program: Program[None]) -> AsyncIterator[Any]:
        return self._steps(Run(program, self._explain))

    async def _steps(self, run: Run[Any]) -> AsyncIterator[Any]:
        try:
            for op in run:
                if isinstance(op, protocol.Emit):
                    yield op.value
                else:
                    await run.settle_async(self._perform(op))
        finally:
            run.close()

    async def _perform(self, op: protocol.Op) -> Any:
        if isinstance(op, protocol.Sleep):
            return await asyncio.sleep(op.seconds)
        if isinstance(op, protocol.Next):
            message = await op.stream.read()
            return protocol.END if message is grpc.aio.EOF else message
        call = op.invoke(self._stub, self._metadata)
        return call if isinstance(op, protocol.Open) else await call
