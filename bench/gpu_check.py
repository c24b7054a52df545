"""GPU check: the real NVML backend against kernels whose duration is known.

Run on a machine with an NVIDIA GPU, PyTorch and nvidia-ml-py (not part of `make test`).
For each duty-cycle scenario, a PyTorch worker process runs matmuls back to back during
its busy phases and idles in between, timing every kernel with CUDA events (the truth).
Meanwhile the production meter (``payper_agent.meter`` over ``payper_agent.nvml``) polls
NVML once a second and integrates the worker's active time. Both per-process APIs are
metered side by side (``nvmlDeviceGetProcessesUtilizationInfo`` and the older
``nvmlDeviceGetProcessUtilization``), each with its own last-seen timestamps.

    PYTHONPATH=gpu-agent python bench/gpu_check.py [--seconds 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

SCENARIOS = [
    # name, busy ms, period ms
    ("duty-10%", 100, 1000),
    ("duty-50%", 500, 1000),
    ("duty-100%", 1000, 1000),
    ("bursts-200ms", 200, 2000),
]


def worker(busy_ms: int, period_ms: int, seconds: float) -> None:
    import torch

    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    print("ready", flush=True)
    time.sleep(2.0)  # a quiet start, so the meter's first samples are idle
    kernel_ms = 0.0
    kernels = 0
    started = time.monotonic()
    next_phase = started
    while time.monotonic() - started < seconds:
        phase_end = next_phase + busy_ms / 1000
        events = []
        while time.monotonic() < phase_end:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            a @ b
            end.record()
            end.synchronize()
            events.append((begin, end))
        kernel_ms += sum(x.elapsed_time(y) for x, y in events)
        kernels += len(events)
        next_phase += period_ms / 1000
        time.sleep(max(0.0, next_phase - time.monotonic()))
    time.sleep(2.0)  # a quiet end, so the last burst closes inside the metered window
    print(json.dumps({"kernel_ms": kernel_ms, "kernels": kernels}), flush=True)


def run_scenario(name: str, busy_ms: int, period_ms: int, seconds: float) -> dict[str, object]:
    import pynvml

    from payper_agent.meter import KnownPids, Meter, SeriesIdentity
    from payper_agent.nvml import APIS, NvmlBackend

    backends = {api: NvmlBackend(pynvml, api=api) for api in APIS}
    process = subprocess.Popen(
        [sys.executable, __file__, "worker", str(busy_ms), str(period_ms), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    identity = SeriesIdentity("check", name, name, "worker")

    meters = {api: Meter(KnownPids({process.pid: identity})) for api in backends}
    raw: dict[str, list[list[int]]] = {api: [] for api in backends}
    errors: dict[str, list[str]] = {api: [] for api in backends}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for api, backend in backends.items():
                meter = meters[api]
                gpu = backend.gpus()[0]
                last = meter.last_seen_us.get(gpu.uuid)
                if last is not None:
                    try:
                        raw[api] += [
                            [s.pid, s.sm_util, s.timestamp_us - last]
                            for s in backend.utilization(gpu, last)
                            if s.pid == process.pid
                        ][:5]
                    except Exception as error:
                        errors[api].append(repr(error))
                meter.poll(backend, lambda g, e, api=api: errors[api].append(repr(e)))
            stop.wait(1.0)

    assert process.stdout.readline().strip() == "ready"
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    truth = json.loads(process.stdout.readline())
    process.wait()
    time.sleep(1.5)
    stop.set()
    thread.join()
    result: dict[str, object] = {
        "scenario": name,
        "busy_ms": busy_ms,
        "period_ms": period_ms,
        "true_kernel_ms": round(truth["kernel_ms"], 1),
        "kernels": truth["kernels"],
        "driver": backends["process-utilization"].driver,
        "gpu": backends["process-utilization"].gpus()[0].product,
    }
    for api, meter in meters.items():
        meter.close_all_bursts()
        series = next(iter(meter.series.values()), None)
        measured_ms = (series.total_x100 / 100_000) if series else 0.0
        result[api] = {
            "measured_ms": round(measured_ms, 1),
            "ratio": round(measured_ms / truth["kernel_ms"], 4) if truth["kernel_ms"] else None,
            "bursts": series.bursts if series else 0,
            "rounded_ms": series.rounded_ms.to_wire() if series else {},
            "first_samples_pid_util_dt_us": raw[api][:12],
            "errors": errors[api][:5],
        }
    for backend in backends.values():
        backend.close()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for name, busy_ms, period_ms in SCENARIOS:
        result = run_scenario(name, busy_ms, period_ms, args.seconds)
        results.append(result)
        print(json.dumps(result), flush=True)
    print()
    print(f"{'scenario':<14}{'true ms':>10}{'v2 ratio':>10}{'v1 ratio':>10}")
    for r in results:
        v2, v1 = r["processes-utilization-info"], r["process-utilization"]
        print(f"{r['scenario']:<14}{r['true_kernel_ms']:>10}{v2['ratio']!s:>10}{v1['ratio']!s:>10}")  # type: ignore[index]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
