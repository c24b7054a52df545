"""Benchmark: the one-time cold build of the cluster binaries, and the warm no-op.

Builds every binary with empty Go module and build caches (fresh temporary
directories, so nothing of this machine's caches helps), as CI does on a fresh machine,
then runs the build again to show that a second build is a no-op.

    .venv/bin/python bench/cold_build.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def build(env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "payper_dev.cli", "cluster", "build"], env=env, check=True
    )
    return time.monotonic() - started


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="payper-cold-build-") as scratch:
        env = {
            **os.environ,
            "XDG_CACHE_HOME": os.path.join(scratch, "cache"),
            "GOMODCACHE": os.path.join(scratch, "gomod"),
            "GOCACHE": os.path.join(scratch, "gobuild"),
            "GOFLAGS": "-modcacherw -mod=mod",
        }
        env.pop("PAYPER_K8S_BIN", None)
        cold = build(env)
        warm = build(env)
    print(f"cold build (empty module and build caches): {cold:.0f} s")
    print(f"second build (cache hit, no-op):            {warm:.2f} s")
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
