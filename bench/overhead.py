"""The supervisor's own CPU with 8 idle workers at the default 1 s poll interval.

    .venv/bin/python bench/overhead.py [--seconds 30]

Prints JSON: the daemon's CPU time over the window as a percentage of one core (target < 1%), and per
poll. Workers are idle, so what is measured is the watchdog: /proc reads, NVML where there is a GPU,
policy evaluation, and gRPC's own idle cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._daemon import daemon  # noqa: E402
from supervisor.settings.demo_model import write_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llms-bench-") as tmp:
        base = Path(tmp)
        write_model(base / "models" / "tiny.gguf")
        models = "\n".join(f'[models.m{i}]\npath = "tiny.gguf"\nn_ctx = 256\nkeep_alive = "-1"\n' for i in range(args.workers))
        with daemon(base, models, 'poll_interval = "1s"') as (_, proc):
            supervisor = psutil.Process(proc.pid)
            time.sleep(2)  # let the start-up settle before the window opens
            before = supervisor.cpu_times()
            start = time.monotonic()
            time.sleep(args.seconds)
            after = supervisor.cpu_times()
            elapsed = time.monotonic() - start
    cpu = (after.user + after.system) - (before.user + before.system)
    print(json.dumps({
        "benchmark": "overhead",
        "workers": args.workers,
        "poll_interval_s": 1.0,
        "window_s": round(elapsed, 1),
        "cpu_percent_of_one_core": round(100 * cpu / elapsed, 3),
        "cpu_ms_per_poll": round(1000 * cpu / elapsed, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
