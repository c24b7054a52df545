"""The real backend: NVML through ``nvidia-ml-py`` (the ``pynvml`` module).

Per GPU and poll: the per-process utilization since the last seen timestamp, and the
PIDs that really run there: the union of the compute, graphics and MPS process lists
(a process on only one of them is still a process using the GPU; a tenant must not escape
the meter by creating a graphics context or going through MPS). NOT_FOUND, and the
wrapper's ``NVMLError(NVML_SUCCESS)`` (its two-call pattern when there are no samples),
mean idle or none. A process-list call that this nvidia-ml-py lacks (AttributeError) or
that the driver answers NOT_SUPPORTED / FUNCTION_NOT_FOUND is skipped for that device from
then on, not retried every poll. GPUs are identified by UUID and product name.

Two calls give per-process utilization: ``nvmlDeviceGetProcessUtilization`` and, since
driver 550, ``nvmlDeviceGetProcessesUtilizationInfo``. On an H200 with driver 580 the
newer call reported integer percents about half a point lower (truncated rather than
rounded), which put a 10 % duty cycle 9.5 % short of the truth while the older call was
within 2.5 % at every duty cycle (``bench/gpu_check.py``, ``bench/README.md``). So the
older call is preferred, the newer one is the fallback where the older is missing, and
``--nvml-api`` pins either.

MIG: per-process utilization is usually not available on MIG instances. Where the GPU
supports GPM, each MIG instance is metered with GPM's ``GRAPHICS_UTIL`` (percent of time
any compute work was active in that instance); otherwise the GPU raises ``Unmetered``,
which the agent reports in a metric, the log and the usage report, so nothing is
silently billed as zero. An instance's time goes to the process holding it; when several
processes share it, it is divided among them in proportion to their own utilization
samples (``nvmlDeviceGetProcessUtilization`` on the instance's handle, where the driver
answers it: it is asked once per poll and, once NOT_SUPPORTED, never again for that
instance), equally otherwise, and the sample says which (``ProcessSample.split``). The
instance's product is its NVML name, which names the MIG profile ("NVIDIA H100 80GB HBM3
MIG 1g.10gb"): what the price table keys a profile by.

``pynvml`` is passed in, so the unit tests drive this code with a fake module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from payper.api.billing_record import EQUAL, PROPORTIONAL, Split
from payper_agent.backends import Gpu, ProcessSample, Unmetered, read_proc_cgroup

PROCESS_UTILIZATION = "process-utilization"
PROCESSES_UTILIZATION_INFO = "processes-utilization-info"
APIS = (PROCESS_UTILIZATION, PROCESSES_UTILIZATION_INFO)
IDLE_CODES = ("NVML_ERROR_NOT_FOUND", "NVML_SUCCESS")
FALLBACK_CODES = ("NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NOT_SUPPORTED")
PROCESS_LISTS = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetMPSComputeRunningProcesses",
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _MigInstance:
    uuid: str
    handle: Any
    gpu_instance_id: int
    product: str
    previous: Any = None
    per_process: bool = True
    """Whether to ask this instance for per-process samples (false once unsupported)."""
    process_lists: list[str] = field(default_factory=lambda: list(PROCESS_LISTS))
    """The process-list calls this instance answers (unsupported ones are dropped)."""


@dataclass
class _Device:
    gpu: Gpu
    handle: Any
    gpm: bool = False
    instances: list[_MigInstance] = field(default_factory=list)
    process_lists: list[str] = field(default_factory=lambda: list(PROCESS_LISTS))
    """The process-list calls this device answers (unsupported ones are dropped)."""


class NvmlBackend:
    def __init__(
        self, nvml: ModuleType, proc: str = "/proc", api: str = PROCESS_UTILIZATION
    ) -> None:
        if api not in APIS:
            raise ValueError(f"unknown NVML API {api!r}; choose one of {', '.join(APIS)}")
        self.nvml = nvml
        self.proc = proc
        self.api = api
        """The per-process call in use; switches to the other once if this one is missing."""
        nvml.nvmlInit()
        self.driver = _text(nvml.nvmlSystemGetDriverVersion())
        self._devices: list[_Device] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            product = _text(nvml.nvmlDeviceGetName(handle))
            mig = self._mig_enabled(handle)
            device = _Device(Gpu(index, uuid, product, mig), handle)
            if mig:
                device.gpm = self._gpm_supported(handle)
                if device.gpm:
                    device.instances = self._mig_instances(handle, product)
            self._devices.append(device)

    def _code(self, name: str) -> int | None:
        value = getattr(self.nvml, name, None)
        return int(value) if value is not None else None

    def _is(self, error: Exception, names: tuple[str, ...]) -> bool:
        value = getattr(error, "value", None)
        return value is not None and value in {self._code(n) for n in names}

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self.nvml.nvmlDeviceGetMigMode(handle)
        except self.nvml.NVMLError:
            return False  # not a MIG-capable GPU
        return bool(current == self._code("NVML_DEVICE_MIG_ENABLE"))

    def _gpm_supported(self, handle: Any) -> bool:
        try:
            return bool(self.nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except (self.nvml.NVMLError, AttributeError):
            return False

    def _mig_instances(self, handle: Any, gpu_product: str) -> list[_MigInstance]:
        instances = []
        for index in range(self.nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = self.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
            except self.nvml.NVMLError:
                continue
            try:
                product = _text(self.nvml.nvmlDeviceGetName(mig))
            except self.nvml.NVMLError:
                product = gpu_product  # priced as the whole GPU rather than not at all
            instances.append(
                _MigInstance(
                    uuid=_text(self.nvml.nvmlDeviceGetUUID(mig)),
                    handle=mig,
                    gpu_instance_id=int(self.nvml.nvmlDeviceGetGpuInstanceId(mig)),
                    product=product,
                )
            )
        return instances

    def _device(self, gpu: Gpu) -> _Device:
        return self._devices[gpu.index]

    # -- Backend ------------------------------------------------------------------------
    def refresh(self) -> None:
        return None  # the driver is asked afresh on every call

    def gpus(self) -> list[Gpu]:
        return [d.gpu for d in self._devices]

    def now_us(self) -> int:
        return time.time_ns() // 1000  # NVML sample timestamps are CPU time in microseconds

    def utilization(self, gpu: Gpu, last_seen_us: int) -> list[ProcessSample]:
        device = self._device(gpu)
        if gpu.mig:
            if not device.gpm:
                raise Unmetered(f"{gpu.uuid}: MIG without GPM support; per-process time unknown")
            return self._mig_utilization(device, last_seen_us)
        raw = self._per_process(device.handle, last_seen_us)
        return [ProcessSample(int(s.pid), int(s.smUtil), int(s.timeStamp)) for s in raw]

    def _per_process(self, handle: Any, last_seen_us: int) -> list[Any]:
        nvml = self.nvml
        switched = False
        while True:
            try:
                if self.api == PROCESSES_UTILIZATION_INFO:
                    return list(nvml.nvmlDeviceGetProcessesUtilizationInfo(handle, last_seen_us))
                return list(nvml.nvmlDeviceGetProcessUtilization(handle, last_seen_us))
            except AttributeError:
                if switched:
                    raise
            except nvml.NVMLError as error:
                if self._is(error, IDLE_CODES):
                    return []
                if switched or not self._is(error, FALLBACK_CODES):
                    raise
            # This driver or nvidia-ml-py lacks the call: use the other one from now on.
            self.api = APIS[1 - APIS.index(self.api)]
            switched = True

    def _mig_utilization(self, device: _Device, last_seen_us: int) -> list[ProcessSample]:
        nvml = self.nvml
        samples = []
        for instance in device.instances:
            current = nvml.nvmlGpmSampleAlloc()
            nvml.nvmlGpmMigSampleGet(device.handle, instance.gpu_instance_id, current)
            now = self.now_us()
            previous, instance.previous = instance.previous, current
            if previous is None:
                continue
            request = nvml.c_nvmlGpmMetricsGet_t()
            request.version = nvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = 1
            request.sample1 = previous
            request.sample2 = current
            request.metrics[0].metricId = nvml.NVML_GPM_METRIC_GRAPHICS_UTIL
            result = nvml.nvmlGpmMetricsGet(request)
            nvml.nvmlGpmSampleFree(previous)
            percent = round(float(result.metrics[0].value))
            pids = self._pids(instance)
            if percent > 0 and pids:
                shares, split = self._shares(instance, pids, last_seen_us)
                samples.append(
                    ProcessSample(
                        min(pids),
                        min(100, percent),
                        now,
                        instance.uuid,
                        instance.product,
                        shares,
                        split,
                    )
                )
        return samples

    def _shares(
        self, instance: _MigInstance, pids: set[int], last_seen_us: int
    ) -> tuple[tuple[tuple[int, int], ...], Split | None]:
        """How an instance's time divides among its processes: by their own samples'
        utilization where the driver gives them, equally otherwise."""
        if len(pids) == 1:
            return (), None
        own = self._instance_processes(instance, pids, last_seen_us)
        if any(own.values()):
            return tuple((pid, own[pid]) for pid in sorted(own) if own[pid]), PROPORTIONAL
        return tuple((pid, 1) for pid in sorted(pids)), EQUAL

    def _instance_processes(
        self, instance: _MigInstance, pids: set[int], last_seen_us: int
    ) -> dict[int, int]:
        """Per PID of the instance, the sum of its samples' smUtil since ``last_seen_us``."""
        own = dict.fromkeys(pids, 0)
        if not instance.per_process:
            return own
        nvml = self.nvml
        try:
            raw = nvml.nvmlDeviceGetProcessUtilization(instance.handle, last_seen_us)
        except AttributeError:
            instance.per_process = False
            return own
        except nvml.NVMLError as error:
            if self._is(error, IDLE_CODES):
                return own
            if self._is(error, FALLBACK_CODES):
                instance.per_process = False  # the usual answer on MIG: not asked again
                return own
            raise
        for sample in raw:
            pid = int(sample.pid)
            if pid in own and 0 <= int(sample.smUtil) <= 100:
                own[pid] += int(sample.smUtil)
        return own

    def _pids(self, target: _Device | _MigInstance) -> set[int]:
        """The union of the process lists, deduplicated by PID."""
        pids: set[int] = set()
        for name in list(target.process_lists):
            try:
                processes = getattr(self.nvml, name)(target.handle)
            except AttributeError:
                target.process_lists.remove(name)  # this nvidia-ml-py lacks the call
                continue
            except self.nvml.NVMLError as error:
                if self._is(error, IDLE_CODES):
                    continue
                if self._is(error, FALLBACK_CODES):
                    target.process_lists.remove(name)  # this driver or device lacks it
                    continue
                raise
            pids.update(int(p.pid) for p in processes)
        return pids

    def running_pids(self, gpu: Gpu) -> set[int]:
        device = self._device(gpu)
        if gpu.mig:
            pids: set[int] = set()
            for instance in device.instances:
                pids |= self._pids(instance)
            return pids
        return self._pids(device)

    def cgroup(self, pid: int) -> str | None:
        return read_proc_cgroup(pid, self.proc)

    def close(self) -> None:
        self.nvml.nvmlShutdown()
