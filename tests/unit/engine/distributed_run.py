"""Jobs through train() in a process of its own whose CPU is split into logical devices: the
split must come before TensorFlow starts, which a pytest process has long done.

    python -m tests.unit.engine.distributed_run '{"split": 2, "jobs": [...]}'

Each job: {"spec": {...}, "workdir": str, "copy_from": a workdir to start as a copy of,
"resume": bool, "stop_at": step or null}; the jobs run one after the other in the process,
sharing one model cache when the plan has "cache": true. Prints one JSON line per job: the
steps, losses and accuracies streamed, its logs, the outcome, the test metrics, or the error
raised.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from stepstream_service.engine.distribution import split_cpu


def run_job(job: dict, models) -> dict:
    import shutil

    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine.datasets import DataPaths
    from stepstream_service.engine.trainer import train
    from stepstream_service.errors import TrainerError

    if job.get("copy_from"):
        shutil.copytree(job["copy_from"], job["workdir"])
    events = []
    stop_at = job.get("stop_at")

    def should_stop() -> bool:
        steps = [e.step for e in events if e.kind == "step"]
        return stop_at is not None and bool(steps) and steps[-1] >= stop_at

    try:
        result = train(
            JobSpec.parse(job["spec"]),
            events.append,
            should_stop,
            workdir=job["workdir"],
            paths=DataPaths(download=False),
            resume=job.get("resume", False),
            tensorboard=False,
            models=models,
        )
    except TrainerError as exc:
        return {"error": type(exc).__name__, "reason": exc.reason, "message": str(exc)}
    steps = [e for e in events if e.kind == "step"]
    return {
        "outcome": result.outcome,
        "stop_reason": result.stop_reason,
        "steps": [e.step for e in steps],
        "losses": [e.loss for e in steps],
        "accuracies": [e.accuracy for e in steps],
        "evals": [e.values for e in events if e.kind == "eval"],
        "checkpoints": [e.step for e in events if e.kind == "checkpoint"],
        "logs": [e.message for e in events if e.kind == "log"],
        "test": result.test_metrics,
    }


def main() -> None:
    plan = json.loads(sys.argv[1])
    split_cpu(plan["split"])
    from stepstream_service.engine.model_cache import ModelCache

    models = ModelCache(64 << 20) if plan.get("cache") else None
    for job in plan["jobs"]:
        print(json.dumps(run_job(job, models)), flush=True)


if __name__ == "__main__":
    main()
