"""The pod runner: real processes where kwok's fake pods are.

kwok gives pods loopback IPs but runs nothing. For pods annotated
``payper.dev/pod-runner: <profile>``, the runner starts the profile's command bound to
the pod's IP. So the gateway really proxies to a process at ``podIP:port``, and the demo
and end-to-end tests exercise the whole request path with no container runtime.

A pod that starts terminating is stopped the way a kubelet stops it, so that draining
(scale-down never cuts a stream) is tested for real: its container's ``preStop`` sleep
first, then SIGTERM, and SIGKILL once the pod's deletion grace period (counted from when
the runner saw the deletion) has run out; only then does the runner remove the pod object
(grace 0, on its UID), as a kubelet does. kwok's delete stage leaves runner pods to the
runner (it removes one only when its grace has run out, in case no runner serves it).

kwok's readiness is a timer, which a process that is still starting would race. So the
runner probes ``podIP:port`` (a TCP connect, as a kubelet's tcpSocket probe does) and
annotates the pod ``payper.dev/pod-runner-listening: "true"`` once the process accepts
connections; kwok's stage for runner pods waits for that annotation before its
cold-start delay starts, so such a pod is never Ready while nothing listens.

A command is a list of arguments with ``{ip}``, ``{port}``, ``{namespace}``, ``{name}``,
``{uid}`` and ``{node}`` placeholders; the process also gets ``POD_IP``, ``POD_NAME``,
``POD_NAMESPACE``, ``POD_UID``, ``NODE_NAME`` and ``PORT`` in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payper.kube import ApiError, Informer, Kube, resource_path

ANNOTATION = "payper.dev/pod-runner"
LISTENING_ANNOTATION = "payper.dev/pod-runner-listening"
DEFAULT_PORT = 8000
DEFAULT_GRACE_S = 30
"""A pod's grace period when it names none (Kubernetes' default)."""
PROBE_INTERVAL_S = 0.02
logger = logging.getLogger(__name__)


@dataclass
class RunningPod:
    uid: str
    ip: str
    port: int
    process: asyncio.subprocess.Process
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    probe: asyncio.Task[None] | None = None


def pod_port(pod: Mapping[str, Any]) -> int:
    for container in pod.get("spec", {}).get("containers", []):
        for port in container.get("ports", []) or []:
            return int(port["containerPort"])
    return DEFAULT_PORT


def grace_seconds(pod: Mapping[str, Any]) -> float:
    """The time a terminating pod has, from the deletion on, to stop: the grace period
    its deletion asked for, else its spec's, else Kubernetes' default."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    for value in (
        meta.get("deletionGracePeriodSeconds"),
        spec.get("terminationGracePeriodSeconds"),
    ):
        if value is not None:
            return max(0.0, float(value))
    return float(DEFAULT_GRACE_S)


def pre_stop_sleep_seconds(pod: Mapping[str, Any]) -> float:
    """The longest ``lifecycle.preStop.sleep`` of the pod's containers (a kubelet runs
    them in parallel); other kinds of hook (exec, httpGet) are not modelled: 0 for them."""
    longest = 0.0
    for container in pod.get("spec", {}).get("containers", []):
        hook = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
        longest = max(longest, float(hook.get("seconds", 0)))
    return longest


class PodRunner:
    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None,
        profiles: Mapping[str, Sequence[str]],
        log_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        stop_grace_s: float = 5.0,
        listen_timeout_s: float = 60.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.profiles = {name: list(cmd) for name, cmd in profiles.items()}
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.stop_grace_s = stop_grace_s
        self.listen_timeout_s = listen_timeout_s
        self.running: dict[str, RunningPod] = {}
        self.draining: dict[str, asyncio.Task[None]] = {}
        """Pods (by UID) being stopped as a kubelet stops a terminating pod."""
        self.started = 0
        self.kube: Kube | None = None

    def _command(self, pod: Mapping[str, Any], profile: str) -> list[str]:
        meta, status = pod["metadata"], pod["status"]
        values = {
            "ip": status["podIP"],
            "port": str(pod_port(pod)),
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "node": pod["spec"].get("nodeName", ""),
        }
        return [part.format(**values) for part in self.profiles[profile]]

    async def _start(self, key: str, pod: Mapping[str, Any], profile: str) -> None:
        meta, status = pod["metadata"], pod["status"]
        env = {
            **os.environ,
            **self.extra_env,
            "POD_IP": status["podIP"],
            "POD_NAME": meta["name"],
            "POD_NAMESPACE": meta["namespace"],
            "POD_UID": meta["uid"],
            "NODE_NAME": pod["spec"].get("nodeName", ""),
            "PORT": str(pod_port(pod)),
        }
        output: Any = asyncio.subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{meta['namespace']}_{meta['name']}.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(pod, profile),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if output is not asyncio.subprocess.DEVNULL:
                output.close()
        entry = RunningPod(uid=meta["uid"], ip=status["podIP"], port=pod_port(pod), process=process)
        entry.probe = asyncio.create_task(self._announce_when_listening(key, pod, entry))
        self.running[key] = entry
        self.started += 1
        logger.info("pod runner: started %s (%s) on %s", key, profile, status["podIP"])

    async def _announce_when_listening(
        self, key: str, pod: Mapping[str, Any], entry: RunningPod
    ) -> None:
        """Probe until the process accepts a connection, then annotate the pod for kwok.

        Gives up (logged; the pod stays not Ready) when the process exits first or does
        not listen within ``listen_timeout_s``.
        """
        deadline = asyncio.get_running_loop().time() + self.listen_timeout_s
        while entry.process.returncode is None:
            try:
                _, writer = await asyncio.open_connection(entry.ip, entry.port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    logger.warning(
                        "pod runner: %s not listening on %s:%d after %.0fs",
                        key,
                        entry.ip,
                        entry.port,
                        self.listen_timeout_s,
                    )
                    return
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            writer.close()
            entry.listening.set()
            if self.kube is not None:
                meta = pod["metadata"]
                annotation = {"uid": meta["uid"], "annotations": {LISTENING_ANNOTATION: "true"}}
                try:
                    await self.kube.patch(
                        resource_path("v1", "pods", meta["namespace"], meta["name"]),
                        {"metadata": annotation},
                    )
                except ApiError as error:  # deleted, or replaced by a pod of the same name
                    logger.warning("pod runner: cannot annotate %s: %s", key, error)
                    return
            logger.info("pod runner: %s listens on %s:%d", key, entry.ip, entry.port)
            return
        logger.warning("pod runner: %s exited (%s) before listening", key, entry.process.returncode)

    async def _stop(self, key: str) -> None:
        """Stop a pod's process at once: its pod is gone from the API, or replaced."""
        entry = self.running.pop(key, None)
        if entry is None:
            return
        await self._terminate(entry, self.stop_grace_s)
        logger.info("pod runner: stopped %s", key)

    async def _terminate(self, entry: RunningPod, grace_s: float) -> None:
        """SIGTERM, then SIGKILL once ``grace_s`` has passed without an exit."""
        if entry.probe is not None:
            entry.probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.probe
        process = entry.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), max(0.0, grace_s))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()

    def _begin_drain(self, key: str, pod: Mapping[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.draining:
            return
        current = self.running.get(key)
        entry = self.running.pop(key) if current is not None and current.uid == uid else None
        task = asyncio.create_task(self._drain(key, pod, entry))
        self.draining[uid] = task
        task.add_done_callback(lambda _: self.draining.pop(uid, None))

    async def _drain(self, key: str, pod: Mapping[str, Any], entry: RunningPod | None) -> None:
        """Stop a terminating pod as a kubelet does, then remove the pod object."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds(pod)
        if entry is not None:
            try:
                pre_stop = min(pre_stop_sleep_seconds(pod), deadline - loop.time())
                if pre_stop > 0 and entry.process.returncode is None:
                    logger.info("pod runner: %s terminating: preStop %.1fs", key, pre_stop)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(entry.process.wait(), pre_stop)
                await self._terminate(entry, deadline - loop.time())
            except asyncio.CancelledError:  # the runner itself stops: no grace left
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(entry.process.pid, signal.SIGKILL)
                await entry.process.wait()
                raise
            logger.info("pod runner: stopped %s (exit %s)", key, entry.process.returncode)
        await self._remove(pod)

    async def _remove(self, pod: Mapping[str, Any]) -> None:
        """Delete a pod whose process has stopped (grace 0, on its UID), as a kubelet does
        once a terminating pod's containers are gone."""
        if self.kube is None:
            return
        meta = pod["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            await self.kube.delete(
                resource_path("v1", "pods", meta["namespace"], meta["name"]), body=options
            )
        except ApiError as error:  # 409: a new pod of that name; the old one is gone
            if not error.conflict:
                logger.warning("pod runner: cannot remove %s: %s", Informer.key(pod), error)

    async def on_event(self, kind: str, pod: dict[str, Any]) -> None:
        key = Informer.key(pod)
        meta = pod["metadata"]
        profile = (meta.get("annotations") or {}).get(ANNOTATION)
        ip = pod.get("status", {}).get("podIP")
        current = self.running.get(key)
        if current is not None and (kind == "DELETED" or current.uid != meta["uid"]):
            await self._stop(key)  # gone from the API without a drain seen, or replaced
            current = None
        if kind == "DELETED" or profile is None:
            return
        if profile not in self.profiles:
            logger.warning("pod runner: %s names unknown profile %r", key, profile)
            return
        if meta.get("deletionTimestamp") is not None:
            self._begin_drain(key, pod)
            return
        if current is not None or not ip:
            return
        await self._start(key, pod, profile)

    async def run(self, ready: threading.Event | None = None) -> None:
        async with Kube.connect(self.kubeconfig) as kube:
            self.kube = kube
            informer = Informer(kube, resource_path("v1", "pods"), self.on_event)
            task = asyncio.create_task(informer.run())
            try:
                await informer.synced.wait()
                if ready is not None:
                    ready.set()
                await task
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                for draining in list(self.draining.values()):
                    draining.cancel()
                await asyncio.gather(*self.draining.values(), return_exceptions=True)
                for key in list(self.running):
                    await self._stop(key)


@contextlib.contextmanager
def running_in_background(runner: PodRunner, timeout_s: float = 30.0) -> Iterator[PodRunner]:
    """Run ``runner`` on its own event loop in a thread; stops its processes on exit."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    main: asyncio.Task[None] | None = None

    def target() -> None:
        nonlocal main
        asyncio.set_event_loop(loop)
        main = loop.create_task(runner.run(ready))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        loop.close()

    thread = threading.Thread(target=target, name="pod-runner", daemon=True)
    thread.start()
    if not ready.wait(timeout_s):
        raise TimeoutError("pod runner did not sync with the API server in time")
    try:
        yield runner
    finally:
        if main is not None:
            loop.call_soon_threadsafe(main.cancel)
        thread.join(timeout_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m payper_dev.cluster.podrunner``: the runner as a process of its own."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(prog="payper-pod-runner", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="a command for pods annotated payper.dev/pod-runner: NAME (repeatable)",
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--log-dir", type=Path)
    args = parser.parse_args(argv)
    profiles = {}
    for item in args.profile:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            parser.error(f"--profile {item!r}: expected NAME=COMMAND")
        profiles[name] = shlex.split(command)
    env = dict(item.partition("=")[::2] for item in args.env)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = PodRunner(args.kubeconfig, profiles, args.log_dir, env)
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(runner.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(main_task)
    loop.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
