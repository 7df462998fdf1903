"""Load test of ``omniar demo``: N concurrent ``gradio_client`` requests against a server on loopback.

The server runs as a subprocess (``python -m omniar.cli demo``) so its peak RSS (VmHWM) is its own.
Each request is a distinct (prompt, seed); its mp4 must have the requested frame count and match the
pipeline run directly in this process, closer to its own reference than to any other request's.
Prints JSON and a table; writes ``--out`` (default benchmarks/results/demo_load.json).

    OMP_NUM_THREADS=2 python benchmarks/demo_load.py --requests 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from omniar.data.video_io import read_video
from omniar.commands.demo import elastic_choices, example_prompts
from omniar.generation import TextToVideoPipeline

RESULTS = Path(__file__).parent / "results" / "demo_load.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mib(pid: int, field: str) -> float:
    """VmRSS / VmHWM of a process from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _connect(url: str, server: subprocess.Popen, timeout: float):
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the demo server exited with code {server.returncode}")
        try:
            return Client(url, verbose=False)
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    pipe = TextToVideoPipeline.from_pretrained(args.model)
    seen, held_out = example_prompts()
    prompts = seen + held_out
    jobs = [(prompts[i % len(prompts)], i) for i in range(args.requests)]  # distinct (prompt, seed) pairs
    full = next(iter(elastic_choices(pipe.model.omniar_config)))

    start = time.perf_counter()  # the same work, sequential and in-process: the baseline
    expected = [pipe(p, num_frames=args.num_frames, seed=s).frames[0] for p, s in jobs]
    sequential_s = time.perf_counter() - start
    side = expected[0].shape[1]

    port = _free_port()
    command = [sys.executable, "-m", "omniar.cli", "demo", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--concurrency", str(args.concurrency), "--max-queue", str(2 * args.requests)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL,  # its stderr stays visible
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        client = _connect(f"http://127.0.0.1:{port}/", server, timeout=120)
        idle_mib = _mib(server.pid, "VmRSS")
        deadline = time.monotonic() + args.timeout
        start = time.perf_counter()
        futures = [client.submit(p, args.num_frames, 3.0, 1.0, 0, 1.0, s, full, api_name="/generate")
                   for p, s in jobs]  # all in flight at once: the queue holds what is not running
        finished: dict[int, float] = {}
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: finished.setdefault(i, time.perf_counter() - start))
        paths = [f.result(timeout=max(1.0, deadline - time.monotonic()))[0] for f in futures]
        concurrent_s = time.perf_counter() - start
        peak_mib = _mib(server.pid, "VmHWM")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    errors, correct = [], 0
    for i, path in enumerate(paths):
        video = read_video(path)
        step = video.shape[1] // side  # undo the app's integer nearest-neighbour upscale
        frames = video[:, step // 2::step, step // 2::step].astype(int)
        distances = [np.abs(frames - ref).mean() if len(ref) == len(frames) else np.inf for ref in expected]
        errors.append(distances[i])
        correct += bool(len(frames) == args.num_frames and np.argmin(distances) == i and distances[i] < 4)
    latencies = sorted(finished.values())
    result = {
        "requests": args.requests, "num_frames": args.num_frames, "server_concurrency": args.concurrency,
        "correct": correct, "all_correct": correct == args.requests,
        "max_mean_abs_error": round(float(max(errors)), 3),
        "sequential_in_process_s": round(sequential_s, 2), "concurrent_through_server_s": round(concurrent_s, 2),
        "server_overhead_ratio": round(concurrent_s / sequential_s, 3),
        "latency_p50_s": round(latencies[len(latencies) // 2], 2), "latency_max_s": round(latencies[-1], 2),
        "server_rss_idle_mib": round(idle_mib, 1), "server_peak_rss_mib": round(peak_mib, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    print("\n| requests | correct | sequential s | concurrent s | ratio | p50 / max latency s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.requests} | {correct} | {result['sequential_in_process_s']} | "
          f"{result['concurrent_through_server_s']} | {result['server_overhead_ratio']} | "
          f"{result['latency_p50_s']} / {result['latency_max_s']} | {result['server_peak_rss_mib']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not result["all_correct"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
