"""A scheduler's preemption inside a test: SIGTERM to this process once a run has logged some steps."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def sigterm_after_steps(run_dir: Path, steps: int = 3) -> None:
    """Send SIGTERM to this process, from a thread, once `run_dir/steps.csv` holds `steps` rows."""

    def preempt() -> None:
        log = run_dir / "steps.csv"
        while not log.is_file() or len(log.read_text().splitlines()) < steps + 1:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
