"""The asyncio twin of `TrainingClient`:

async with AsyncTrainingClient("localhost:50051") as client:
    job = await client.submit("examples/mnist_mlp.yaml")
    async for event in job.stream():
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from stepstream.client import (
    _RETRYABLE,
    DEFAULT_ADDRESS,
    JobInfo,
    Metrics,
    job_name,
    metrics_from_proto,
    spec_request,
)
from stepstream.connection import Credentials
from stepstream.kernel.events import Event, StateEvent
from stepstream.kernel.spec import JobSpec
from stepstream.kernel.wire import events_of
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc


class AsyncJob:
    def __init__(self, client: AsyncTrainingClient, name: str):
        self.client = client
        self.name = job_name(name)
        self.id = self.name.removeprefix("jobs/")

    def __repr__(self) -> str:
        return f"AsyncJob({self.name!r})"

    async def info(self) -> JobInfo:
        return JobInfo.from_proto(
            await self.client._call("GetJob", pb.GetJobRequest(name=self.name))
        )

    async def stream(
        self, after_seq: int = 0, *, retry_seconds: float = 60.0
    ) -> AsyncIterator[Event]:
        """Like Job.stream: live events, resumed from the last seq after a dropped connection."""
        loop = asyncio.get_running_loop()
        cursor, deadline = after_seq, None
        while True:
            try:
                call = self.client._stub.WatchJob(
                    pb.WatchJobRequest(name=self.name, after_seq=cursor),
                    metadata=self.client._metadata,
                )
                async for response in call:
                    deadline = None
                    for event in events_of(response):
                        cursor = event.seq
                        yield event
                        if isinstance(event, StateEvent) and event.terminal:
                            return
                return
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                deadline = deadline or loop.time() + retry_seconds
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def wait(self, timeout: float | None = None) -> JobInfo:
        async def until_done() -> JobInfo:
            while not (info := await self.info()).terminal:
                await asyncio.sleep(0.1)
            return info

        return await asyncio.wait_for(until_done(), timeout)

    async def cancel(self) -> JobInfo:
        return JobInfo.from_proto(
            await self.client._call("CancelJob", pb.CancelJobRequest(name=self.name))
        )

    async def metrics(self, max_points: int = 0) -> Metrics:
        request = pb.GetJobMetricsRequest(name=self.name, max_points=max_points)
        return metrics_from_proto(await self.client._call("GetJobMetrics", request))

    async def download_model(self, path: str | Path) -> Path:
        path = Path(path)
        target = tmp = None
        try:
            async for chunk in self.client._stub.DownloadModel(
                pb.DownloadModelRequest(name=self.name), metadata=self.client._metadata
            ):
                if tmp is None:
                    target = path / chunk.filename if path.is_dir() else path
                    tmp = target.with_name(target.name + ".partial")
                    tmp.write_bytes(b"")
                with tmp.open("ab") as out:
                    out.write(chunk.data)
            if tmp is None or target is None:
                raise RuntimeError(f"{self.name}: the server sent an empty model")
            tmp.replace(target)
            return target
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()


class AsyncTrainingClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ):
        self.address, self.timeout = address, timeout
        creds = Credentials(token, tls, ca_cert, client_cert, client_key)
        self._channel = creds.aio_channel(address)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._metadata = creds.metadata()

    async def __aenter__(self) -> AsyncTrainingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any) -> Any:
        return await getattr(self._stub, method)(
            request, timeout=self.timeout, metadata=self._metadata
        )

    async def submit(
        self,
        spec: JobSpec | Mapping[str, Any] | str | Path,
        *,
        request_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 0,
    ) -> AsyncJob:
        request = spec_request(spec, request_id, priority, max_attempts)
        return AsyncJob(self, (await self._call("CreateJob", request)).name)

    def job(self, name: str) -> AsyncJob:
        return AsyncJob(self, name)

    async def jobs(
        self, *, state: str | None = None, page_size: int = 50
    ) -> AsyncIterator[JobInfo]:
        token = ""
        while True:
            page = await self._call(
                "ListJobs",
                pb.ListJobsRequest(
                    filter=f"state={state}" if state else "", page_size=page_size, page_token=token
                ),
            )
            for job in page.jobs:
                yield JobInfo.from_proto(job)
            token = page.next_page_token
            if not token:
                return
