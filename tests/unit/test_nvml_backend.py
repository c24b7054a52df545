"""The real NVML backend against a fake ``pynvml`` module (no GPU needed).

The fake mimics nvidia-ml-py's surface and its oddities: NOT_FOUND for idle processes,
``NVMLError(NVML_SUCCESS)`` from the two-call pattern when there are no samples, a
missing newer call on older drivers, process-list calls a version lacks or a driver does
not support, MIG without and with GPM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from payper.api.billing_record import SplitUs
from payper_agent import reporting
from payper_agent.backends import ProcessSample, Unmetered
from payper_agent.meter import KnownPids, Meter, SeriesIdentity, divide, restore, snapshot
from payper_agent.nvml import PROCESS_UTILIZATION, PROCESSES_UTILIZATION_INFO, NvmlBackend


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


@dataclass
class FakeDevice:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    mig: bool = False
    gpm: bool = False
    samples: list[tuple[int, int, int]] = field(default_factory=list)
    """(pid, smUtil, timestamp)"""
    pids: list[int] = field(default_factory=list)
    """On the compute process list."""
    graphics_pids: list[int] = field(default_factory=list)
    mps_pids: list[int] = field(default_factory=list)
    list_errors: dict[str, int] = field(default_factory=dict)
    """Per process list ("compute", "graphics", "mps"): the NVML error it raises."""
    error: int | None = None
    instances: list[FakeDevice] = field(default_factory=list)
    gpm_util: float = 0.0
    gpu_instance_id: int = 0


class FakeNvml:
    NVMLError = NVMLError
    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_UNKNOWN = 999
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_METRIC_GRAPHICS_UTIL = 1

    def __init__(
        self,
        devices: list[FakeDevice],
        has_new_call: bool = True,
        new_call_error: int | None = None,
    ) -> None:
        self.devices = devices
        self.has_new_call = has_new_call
        self.new_call_error = new_call_error
        self.calls: list[str] = []
        self.missing: set[str] = set()
        """Process lists ("compute", "graphics", "mps") this nvidia-ml-py lacks."""
        self.initialised = False

    # lifecycle
    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.00"

    # devices
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> bytes:
        return handle.name.encode()

    def nvmlDeviceGetMigMode(self, handle: FakeDevice) -> tuple[int, int]:
        return (1, 1) if handle.mig else (0, 0)

    def nvmlGpmQueryDeviceSupport(self, handle: FakeDevice) -> Any:
        return SimpleNamespace(isSupportedDevice=1 if handle.gpm else 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeDevice) -> int:
        return len(handle.instances) + 1  # one empty slot

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeDevice, index: int) -> FakeDevice:
        if index >= len(handle.instances):
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return handle.instances[index]

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeDevice) -> int:
        return handle.gpu_instance_id

    # utilization
    def _samples(self, handle: FakeDevice, last: int) -> list[Any]:
        if handle.error is not None:
            raise NVMLError(handle.error)
        fresh = [s for s in handle.samples if s[2] > last]
        if not fresh:
            raise NVMLError(self.NVML_SUCCESS)  # the wrapper's two-call pattern, no samples
        return [SimpleNamespace(pid=p, smUtil=u, timeStamp=t) for p, u, t in fresh]

    def nvmlDeviceGetProcessesUtilizationInfo(self, handle: FakeDevice, last: int) -> list[Any]:
        self.calls.append("new")
        if not self.has_new_call:
            raise AttributeError(
                "module 'pynvml' has no attribute 'nvmlDeviceGetProcessesUtilizationInfo'"
            )
        if self.new_call_error is not None:
            raise NVMLError(self.new_call_error)
        return self._samples(handle, last)

    def nvmlDeviceGetProcessUtilization(self, handle: FakeDevice, last: int) -> list[Any]:
        self.calls.append("old")
        return self._samples(handle, last)

    def _processes(self, handle: FakeDevice, kind: str, pids: list[int]) -> list[Any]:
        self.calls.append(kind)
        if kind in self.missing:
            raise AttributeError(f"module 'pynvml' has no attribute for the {kind} list")
        if kind in handle.list_errors:
            raise NVMLError(handle.list_errors[kind])
        return [SimpleNamespace(pid=p, usedGpuMemory=None) for p in pids]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[Any]:
        return self._processes(handle, "compute", handle.pids)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeDevice) -> list[Any]:
        return self._processes(handle, "graphics", handle.graphics_pids)

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: FakeDevice) -> list[Any]:
        return self._processes(handle, "mps", handle.mps_pids)

    # GPM
    def nvmlGpmSampleAlloc(self) -> Any:
        return SimpleNamespace(util=None)

    def nvmlGpmMigSampleGet(self, handle: FakeDevice, gpu_instance_id: int, sample: Any) -> Any:
        instance = next(i for i in handle.instances if i.gpu_instance_id == gpu_instance_id)
        sample.util = instance.gpm_util
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        return None

    def c_nvmlGpmMetricsGet_t(self) -> Any:
        return SimpleNamespace(
            version=0,
            numMetrics=0,
            sample1=None,
            sample2=None,
            metrics=[SimpleNamespace(metricId=0, value=0.0)],
        )

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        assert request.metrics[0].metricId == self.NVML_GPM_METRIC_GRAPHICS_UTIL
        request.metrics[0].value = request.sample2.util
        return request


def test_devices_are_identified_by_uuid_and_product() -> None:
    nvml = FakeNvml([FakeDevice("GPU-a"), FakeDevice("GPU-b", name="NVIDIA A100-SXM4-40GB")])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    assert [(g.index, g.uuid, g.product, g.mig) for g in backend.gpus()] == [
        (0, "GPU-a", "NVIDIA H100 80GB HBM3", False),
        (1, "GPU-b", "NVIDIA A100-SXM4-40GB", False),
    ]
    assert backend.driver == "580.00"
    backend.close()
    assert not nvml.initialised


@pytest.mark.parametrize("code", ["NVML_ERROR_NOT_FOUND", "NVML_SUCCESS"])
def test_not_found_and_the_success_oddity_mean_idle(code: str) -> None:
    nvml = FakeNvml([FakeDevice("GPU-a", samples=[(5, 50, 10)])])
    nvml.devices[0].error = getattr(FakeNvml, code)
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    assert backend.utilization(backend.gpus()[0], 0) == []


def test_other_driver_errors_surface() -> None:
    nvml = FakeNvml([FakeDevice("GPU-a", error=FakeNvml.NVML_ERROR_UNKNOWN)])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    with pytest.raises(NVMLError):
        backend.utilization(backend.gpus()[0], 0)


def test_the_older_call_is_preferred_and_the_newer_is_the_fallback() -> None:
    device = FakeDevice("GPU-a", samples=[(5, 40, 2_000_000)], pids=[5])
    nvml = FakeNvml([device])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    assert backend.utilization(backend.gpus()[0], 1_000_000) == [ProcessSample(5, 40, 2_000_000)]
    assert nvml.calls == ["old"]

    nvml_old_missing = FakeNvml([device])
    nvml_old_missing.nvmlDeviceGetProcessUtilization = lambda *_: (_ for _ in ()).throw(  # type: ignore[method-assign]
        NVMLError(FakeNvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    )
    backend = NvmlBackend(nvml_old_missing)  # type: ignore[arg-type]
    assert backend.utilization(backend.gpus()[0], 1_000_000) == [ProcessSample(5, 40, 2_000_000)]
    assert backend.api == PROCESSES_UTILIZATION_INFO


@pytest.mark.parametrize(
    ("has_new_call", "new_call_error"),
    [
        (False, None),
        (True, FakeNvml.NVML_ERROR_FUNCTION_NOT_FOUND),
        (True, FakeNvml.NVML_ERROR_NOT_SUPPORTED),
    ],
    ids=["old-nvidia-ml-py", "old-driver", "not-supported"],
)
def test_pinning_the_newer_call_falls_back_when_it_is_missing(
    has_new_call: bool, new_call_error: int | None
) -> None:
    device = FakeDevice("GPU-a", samples=[(5, 40, 2_000_000)], pids=[5])
    nvml = FakeNvml([device], has_new_call=has_new_call, new_call_error=new_call_error)
    backend = NvmlBackend(nvml, api=PROCESSES_UTILIZATION_INFO)  # type: ignore[arg-type]
    assert backend.utilization(backend.gpus()[0], 1_000_000) == [ProcessSample(5, 40, 2_000_000)]
    assert backend.api == PROCESS_UTILIZATION
    assert nvml.calls[-1] == "old"


def test_running_pids_are_the_union_of_the_compute_graphics_and_mps_lists() -> None:
    device = FakeDevice("GPU-a", pids=[5, 6], graphics_pids=[6, 7], mps_pids=[8, 5])
    backend = NvmlBackend(FakeNvml([device]))  # type: ignore[arg-type]
    assert backend.running_pids(backend.gpus()[0]) == {5, 6, 7, 8}


def test_a_process_only_on_the_graphics_or_mps_list_is_metered() -> None:
    device = FakeDevice(
        "GPU-a", samples=[(7, 30, 2_000_000), (8, 20, 2_000_000)], graphics_pids=[7], mps_pids=[8]
    )
    backend = NvmlBackend(FakeNvml([device]))  # type: ignore[arg-type]
    meter = Meter(KnownPids({7: SeriesIdentity("ns", "g", "uid-g", "c")}))
    meter.last_seen_us["GPU-a"] = 1_000_000
    result = meter.poll(backend)
    assert (result.samples, result.dropped) == (2, 0)
    (series,) = meter.series.values()
    assert series.total_x100 == 30 * 1_000_000
    assert meter.unattributed_x100 == 20 * 1_000_000, "an MPS client of no pod: unattributed"


@pytest.mark.parametrize(
    "missing",
    [
        {"graphics": FakeNvml.NVML_ERROR_NOT_SUPPORTED},
        {"graphics": FakeNvml.NVML_ERROR_FUNCTION_NOT_FOUND},
        {"graphics": None},  # None: the call is missing from nvidia-ml-py
    ],
    ids=["not-supported", "function-not-found", "missing-call"],
)
def test_an_unsupported_process_list_is_skipped_and_not_asked_again(
    missing: dict[str, int | None],
) -> None:
    device = FakeDevice("GPU-a", pids=[5], graphics_pids=[6], mps_pids=[7])
    nvml = FakeNvml([device])
    for kind, code in missing.items():
        if code is None:
            nvml.missing.add(kind)
        else:
            device.list_errors[kind] = code
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    (gpu,) = backend.gpus()
    assert backend.running_pids(gpu) == {5, 7}
    assert backend.running_pids(gpu) == {5, 7}
    assert nvml.calls.count("graphics") == 1, "remembered, not retried every poll"
    assert nvml.calls.count("compute") == nvml.calls.count("mps") == 2


@pytest.mark.parametrize("code", ["NVML_ERROR_NOT_FOUND", "NVML_SUCCESS"])
def test_a_process_list_answering_not_found_or_the_success_oddity_has_none(code: str) -> None:
    device = FakeDevice("GPU-a", pids=[5], mps_pids=[7])
    device.list_errors["mps"] = getattr(FakeNvml, code)
    nvml = FakeNvml([device])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    (gpu,) = backend.gpus()
    assert backend.running_pids(gpu) == {5}
    assert backend.running_pids(gpu) == {5}
    assert nvml.calls.count("mps") == 2, "none this time; asked again next poll"


def test_other_process_list_errors_surface() -> None:
    device = FakeDevice("GPU-a", pids=[5], list_errors={"graphics": FakeNvml.NVML_ERROR_UNKNOWN})
    backend = NvmlBackend(FakeNvml([device]))  # type: ignore[arg-type]
    with pytest.raises(NVMLError):
        backend.running_pids(backend.gpus()[0])


def test_unknown_api_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown NVML API"):
        NvmlBackend(FakeNvml([]), api="v3")  # type: ignore[arg-type]


def test_garbage_samples_are_dropped_by_the_meter() -> None:
    device = FakeDevice(
        "GPU-a",
        samples=[
            (5, 40, 2_000_000),  # good: 40 % of 1 s
            (6, 140, 2_000_000),  # smUtil > 100
            (7, 30, 2_000_000),  # not a running process
            (8, 30, 900_000),  # not after the last seen timestamp (filtered by NVML too)
        ],
        pids=[5, 6, 8],
    )
    nvml = FakeNvml([device])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    identity = SeriesIdentity("ns", "p", "uid", "c")
    meter = Meter(KnownPids({5: identity}))
    meter.last_seen_us["GPU-a"] = 1_000_000
    result = meter.poll(backend)
    assert result.samples == 1
    assert result.dropped == 2  # the stale one never left NVML
    (series,) = meter.series.values()
    assert series.total_x100 == 40 * 1_000_000
    assert meter.last_seen_us["GPU-a"] == 2_000_000


def test_mig_without_gpm_is_unmetered_never_zero() -> None:
    nvml = FakeNvml(
        [
            FakeDevice(
                "GPU-mig", mig=True, gpm=False, instances=[FakeDevice("MIG-1", gpu_instance_id=1)]
            )
        ]
    )
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    (gpu,) = backend.gpus()
    assert gpu.mig
    with pytest.raises(Unmetered):
        backend.utilization(gpu, 0)
    meter = Meter(KnownPids({}))
    meter.poll(backend)
    result = meter.poll(backend)
    assert result.unmetered == ["GPU-mig"]
    assert meter.unmetered == {"GPU-mig"}


def test_mig_with_gpm_meters_each_instance_for_its_process() -> None:
    one = FakeDevice("MIG-one", pids=[11, 12], gpm_util=37.4, gpu_instance_id=1)
    two = FakeDevice("MIG-two", pids=[], gpm_util=80.0, gpu_instance_id=2)
    nvml = FakeNvml([FakeDevice("GPU-mig", mig=True, gpm=True, instances=[one, two])])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    (gpu,) = backend.gpus()
    assert backend.utilization(gpu, 0) == []  # the first GPM sample only opens the period
    samples = backend.utilization(gpu, 0)
    assert len(samples) == 1  # the instance with no process is not billed to anyone
    assert (samples[0].pid, samples[0].sm_util, samples[0].device) == (11, 37, "MIG-one")
    assert (samples[0].shares, samples[0].split) == (((11, 1), (12, 1)), "equal")
    assert backend.running_pids(gpu) == {11, 12}


@pytest.mark.parametrize(
    ("amount", "weights", "parts"),
    [
        (50_000_000, [1, 1, 1], [16_666_667, 16_666_667, 16_666_666]),
        (10, [3, 1], [8, 2]),  # 7.5 and 2.5: the tie goes to the first
        (7, [0, 1], [0, 7]),
        (0, [2, 5], [0, 0]),
        (100, [1, 2, 3, 4], [10, 20, 30, 40]),
        (11, [1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 1, 1, 1]),
    ],
)
def test_divide_is_exact_and_proportional(
    amount: int, weights: list[int], parts: list[int]
) -> None:
    assert divide(amount, weights) == parts
    assert sum(parts) == amount


MIG_NAME = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
IDENTITIES = {pid: SeriesIdentity("ns", f"p{pid}", f"uid-{pid}", "c") for pid in (11, 12, 13)}


def _shared_instance(**instance: Any) -> tuple[FakeNvml, NvmlBackend, Meter, list[int]]:
    """One MIG instance at 50 % held by three processes, and a meter over it with a fake
    clock: polls at 1 s (the GPU's first sight), 2 s (the first GPM sample) and 3 s."""
    one = FakeDevice("MIG-one", name=MIG_NAME, pids=[11, 12, 13], gpm_util=50.0, **instance)
    one.gpu_instance_id = 1
    nvml = FakeNvml([FakeDevice("GPU-mig", mig=True, gpm=True, instances=[one])])
    backend = NvmlBackend(nvml)  # type: ignore[arg-type]
    clock = [0]
    backend.now_us = lambda: clock[0]  # type: ignore[method-assign]
    meter = Meter(KnownPids(IDENTITIES))
    for second in (1, 2, 3):
        clock[0] = second * 1_000_000
        meter.poll(backend)
    return nvml, backend, meter, clock


def test_a_shared_mig_instance_is_split_equally_without_per_process_samples() -> None:
    nvml, backend, meter, clock = _shared_instance(error=FakeNvml.NVML_ERROR_NOT_SUPPORTED)
    active = {s.identity.pod: s.total_x100 for s in meter.series.values()}
    assert active == {"p11": 16_666_667, "p12": 16_666_667, "p13": 16_666_666}
    assert sum(active.values()) == 50 * 1_000_000, "the instance's time, exactly"
    assert all(s.split_x100 == {"equal": s.total_x100} for s in meter.series.values())
    assert {(s.gpu, s.product) for s in meter.series.values()} == {("MIG-one", MIG_NAME)}
    clock[0] = 4_000_000
    meter.poll(backend)
    assert nvml.calls.count("old") == 1, "NOT_SUPPORTED on the instance: not asked again"
    report = reporting.cut(meter, "agent", 1, "node", 0, 10_000)
    assert {s.pod: s.split_us for s in report.series} == {
        "p11": SplitUs(equal=333_333),
        "p12": SplitUs(equal=333_333),
        "p13": SplitUs(equal=333_333),
    }
    assert {s.gpu_product for s in report.series} == {MIG_NAME}
    restored = Meter(KnownPids(IDENTITIES))
    restore(restored, snapshot(meter))
    clock[0] = 5_000_000
    restored.poll(backend)
    later = reporting.cut(restored, "agent", 2, "node", 10_000, 20_000)
    # The checkpoint kept what was reported: only the new second, carrying the remainders.
    assert {s.pod: s.split_us for s in later.series} == {
        "p11": SplitUs(equal=166_667),
        "p12": SplitUs(equal=166_667),
        "p13": SplitUs(equal=166_666),
    }
    assert all(s.split_us and s.split_us.equal == s.active_us for s in later.series)


def test_a_shared_mig_instance_is_split_by_the_processes_own_samples() -> None:
    # The driver's per-process samples on the instance: 11 ran three times as much as 12,
    # 13 not at all. (The 1_500_000 sample is older than the period and not counted.)
    samples = [(11, 30, 2_500_000), (12, 10, 2_500_000), (13, 90, 1_500_000)]
    nvml, _backend, meter, _clock = _shared_instance(samples=samples)
    active = {s.identity.pod: s.total_x100 for s in meter.series.values()}
    assert active == {"p11": 37_500_000, "p12": 12_500_000}
    assert all(s.split_x100 == {"proportional": s.total_x100} for s in meter.series.values())
    assert nvml.calls.count("old") == 1
