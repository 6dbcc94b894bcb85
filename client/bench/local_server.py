"""``python -m server`` as a child process, for the demo and the benchmarks: the client and the
server then have an interpreter (and a GIL) each, as they would on separate hosts.

>>> with LocalServer(engine_dir, "--policy", "fcfs") as server:  # doctest: +SKIP
...     print(server.address)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType


class LocalServer:
    """Starts the server (``python -m MODULE``, a server's command line) on a free port;
    ``address`` comes from its ``listening on`` line.

    Its batch jobs go to a job store of its own in a temporary directory (removed on stop)
    unless ``--job-store`` is among the arguments: a benchmark's jobs do not belong in the
    user's store, and a server already using that store would refuse to share it."""

    def __init__(
        self,
        engine: str | Path,
        *extra_args: str,
        log_path: Path | None = None,
        module: str = "server",
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115
        self._store_dir: tempfile.TemporaryDirectory[str] | None = None
        if "--job-store" not in extra_args:
            self._store_dir = tempfile.TemporaryDirectory(prefix="backfill-jobs-")
            extra_args = (*extra_args, "--job-store", str(Path(self._store_dir.name) / "jobs.db"))
        # The load generator shares this host's cores with the server: one BLAS thread keeps
        # OpenBLAS's spinning workers from fighting it (BACKFILL_CPU_THREADS overrides).
        env = {**os.environ, "BACKFILL_CPU_THREADS": os.environ.get("BACKFILL_CPU_THREADS", "1")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--engine", str(engine), "--port", "0", *extra_args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
            text=True,
        )
        self.address = self._wait_listening()

    def _wait_listening(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                return line.split()[-1]
        self.stop()
        raise RuntimeError(f"the server exited before listening (log: {self.log_path})")

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGINT (the server drains), then SIGKILL after timeout_s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        if self._store_dir is not None:
            self._store_dir.cleanup()
        return self.proc.returncode
