"""The run scaffold every training loop stands on: directory, lock, config, log, progress, checkpoints, guard, signals.

A loop builds its data and networks, opens a `Run` (which picks a new directory or the one to resume,
locks it for the run's life and says from which checkpoint to restore), then runs its step body and
calls the run for the rest: `count` (the non-finite guard), `advance`, `due`, `log`, `end_step`
(checkpoints on cadence and on preemption) and `finish`. What the scaffold guarantees therefore holds
for every loop:
  - a run directory is created atomically and locked; a second process on it gets a clear error;
  - SIGTERM (how schedulers preempt) and Ctrl-C finish the current step, save a checkpoint and stop
    with one line that says how to resume;
  - no checkpoint is written while a streak of non-finite steps is on, so the newest checkpoint is
    always from before the streak and is the one the divergence error names;
  - `resume="auto"` continues the config's run if it has a checkpoint and starts it otherwise;
  - a finished run is not resumed (it says how to extend it instead).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from vitlab.config import RunConfig, from_dict
from vitlab.data.stream.workers import DataWait
from vitlab.errors import VitlabError
from vitlab.runs import checkpoint as ckpt
from vitlab.runs.checkpoint import LOCK_FILE
from vitlab.runs.kinds import run_command
from vitlab.runtime import distributed
from vitlab.runtime.allocator import host_memory
from vitlab.runtime.context import Runtime
from vitlab.train.run_log import RunLog

AUTO = "auto"


class TrainingDiverged(VitlabError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


class RunInterrupted(VitlabError):
    """Raised after SIGTERM or Ctrl-C once the step in progress is saved; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A distinct 63-bit seed per (seed, step, rank, stream)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """Create `out_dir/name`, or `name-2`, … when taken, atomically (two runs started together get two folders)."""
    base = Path(out_dir) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        run_dir = base if n == 1 else base.with_name(f"{name}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1


def load_run_config(run_dir: Path, cls: type = RunConfig):
    """The resolved config (of kind `cls`) saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise VitlabError(f"{run_dir} is not a vitlab run directory (no config.yaml); give the folder a run made")
    return from_dict(cls, yaml.safe_load(path.read_text())).validate()


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint to resume from."""
    try:
        ckpt.find_checkpoint(run_dir)
        return True
    except VitlabError:
        return False


def choose_run_dir(config, resume: str | Path | None) -> tuple[Path, bool]:
    """The run directory and whether it resumes: a new one, the one given, or (`auto`) the config's own."""
    if resume is None and getattr(config.train, "resume", None) == AUTO:
        resume = AUTO
    if resume is None:
        return new_run_dir(config.out_dir, config.name), False
    if str(resume) == AUTO:
        run_dir = Path(config.out_dir) / config.name
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, has_checkpoint(run_dir)
    run_dir = Path(resume)
    ckpt.find_checkpoint(run_dir)  # a clear error when there is nothing to resume
    return run_dir, True


class RunLock:
    """An exclusive lock on a run directory for the life of the process (released by the OS if it dies)."""

    def __init__(self, run_dir: Path):
        self.file = open(run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise VitlabError(
                f"{run_dir} is in use by {holder}; wait for it to end, or start a separate run (another name)"
            ) from None
        self.file.truncate(0)
        self.file.write(f"process {os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


class Run:
    """One training run of any loop: what happens around the step body."""

    def __init__(
        self,
        config,
        ctx: Runtime,
        resume: str | Path | None,
        total_steps: int,
        steps_per_epoch: int,
        progress: bool = True,
    ):
        self.config, self.ctx, self.tc = config, ctx, config.train
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.dir, resuming = distributed.broadcast_object(choose_run_dir(config, resume) if ctx.is_main else None)
        self.lock = RunLock(self.dir) if ctx.is_main else None
        self.checkpoint = ckpt.find_checkpoint(self.dir) if resuming else None
        self.step = ckpt.read_meta(self.checkpoint)["step"] if resuming else 0
        if self.step >= total_steps and (self.dir / "results.json").is_file():
            self.close()
            raise VitlabError(
                f"{self.dir} is finished (step {self.step} of {total_steps}); to train it longer, resume it with "
                "more epochs (--set train.epochs=…), or start a new run"
            )
        self.log_file: RunLog | None = None
        if ctx.is_main:
            ckpt.write_text_atomic(self.dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            wandb = config.log.wandb_project if config.log.wandb else None
            self.log_file = RunLog(self.dir, self.step, wandb, config.to_dict())
        self.first_step = self.step
        self.progress = progress and ctx.is_main
        self._bar: tqdm | None = None  # opened by the first step, below the start block (`announce`)
        self.bad_in_row = self.skipped = self.seen = 0
        self.save_pending = False
        self.signal = 0
        self.previous_handlers: dict[int, object] = {}
        self.started = time.perf_counter()
        self.wait = DataWait()

    # -- life cycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.close()

    def close(self) -> None:
        """Close the progress bar and the log and release the lock (also after an error)."""
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
        if getattr(self, "log_file", None) is not None:
            self.log_file.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.ctx.is_main:
            name = signal.Signals(signum).name
            print(f"\n{name} received: saving a checkpoint at the end of this step, then stopping", file=sys.stderr)

    @property
    def bar(self) -> tqdm:
        """The progress bar, opened at its first use."""
        if self._bar is None:
            self._bar = tqdm(
                total=self.total_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
            )
        return self._bar

    # -- the step -----------------------------------------------------------------------------------
    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @staticmethod
    def set_lr(optimizers: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer], lr: float) -> None:
        """Set the LR of every parameter group (times its `lr_scale`, for layer-wise decay)."""
        for optimizer in optimizers.values() if isinstance(optimizers, Mapping) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def count(self, finite: bool, overflow: bool = False) -> None:
        """Count a step as finite or not (a non-finite step is skipped by the loop).

        An `overflow` (fp16 loss scaling finding its range) is skipped too, but is no sign of divergence.
        """
        self.bad_in_row = 0 if finite or overflow else self.bad_in_row + 1
        self.skipped += not finite

    @property
    def diverged(self) -> bool:
        return self.bad_in_row >= self.tc.max_bad_steps

    def check_stepped(self) -> None:
        """Fail a run none of whose steps (this session) reached the optimizer: its model is the one it started from."""
        done = self.step - self.first_step
        if done and self.skipped == done:
            raise TrainingDiverged(
                f"no optimizer step was taken: all {done} steps{' since resuming' if self.first_step else ''} had a "
                "non-finite loss or gradient and were skipped, so the model was never trained; check the starting "
                "weights (finetune.checkpoint), lower optim.lr, or set optim.clip_grad_norm"
            )

    def divergence(self, what: str, details: str, hint: str) -> TrainingDiverged:
        """The error that ends a diverged run: where, the values, the last good checkpoint and what to try."""
        last = ckpt.find_checkpoint(self.dir) if has_checkpoint(self.dir) else "none"
        return TrainingDiverged(
            f"training diverged: {self.bad_in_row} steps in a row with a non-finite {what}, the last at step "
            f"{self.step} ({details}); last good checkpoint: {last}. {hint}"
        )

    def batches(self, source: Iterable) -> Iterator:
        """Iterate `source`, timing how long the loop waits for each batch (see `data_wait`)."""
        return self.wait.wrap(source)

    def data_wait(self) -> float:
        """The fraction of the time since the last call that the loop spent waiting for data."""
        fraction = self.wait.fraction
        self.wait.reset()
        return fraction

    def advance(self, images: int) -> None:
        """One step done on `images` images (the global batch)."""
        self.step += 1
        self.seen += images
        self.bar.update(1)

    def due(self, every: int) -> bool:
        """Whether something done every `every` steps (and at the end) is due now."""
        return self.step % every == 0 or self.step == self.total_steps

    @property
    def images_per_s(self) -> float:
        return self.seen / max(time.perf_counter() - self.started, 1e-9)

    def log(self, kind: str, values: dict[str, float], postfix: dict[str, str] | None = None, step: int | None = None) -> None:
        """Record `values` at this step (or `step`) under `kind` ('steps' or 'epochs'); show `postfix` on the bar."""
        if postfix:
            self.bar.set_postfix(postfix)
            if not self.progress and self.ctx.is_main and kind == "steps":
                shown = "  ".join(f"{k} {v}" for k, v in postfix.items())
                done = self.step - self.first_step
                eta = (self.total_steps - self.step) * self.elapsed() / max(done, 1)
                print(f"step {self.step}/{self.total_steps}  {shown}  ETA {eta / 60:.1f} min", flush=True)
        if self.log_file is not None:
            self.log_file.log(kind, self.step if step is None else step, values)

    def announce(self, facts: dict[str, str]) -> None:
        """Print, once at the start, where the run goes and what it will do (main rank)."""
        if not self.ctx.is_main:
            return
        state = f"resuming from step {self.step} ({self.checkpoint})" if self.checkpoint else "new run"
        facts = {**facts, "host memory": host_memory()}
        width = max(map(len, facts))
        lines = [f"vitlab {self.command}: {self.dir} ({state})"]
        lines += [f"  {key:<{width}}  {value}" for key, value in facts.items()]
        self.write("\n".join(lines))

    def image(self, tag: str, path: Path) -> None:
        """Show a PNG the run wrote in TensorBoard at this step (main rank)."""
        if self.log_file is not None:
            self.log_file.image(tag, path, self.step)

    def write(self, line: str) -> None:
        """Print a line above the progress bar (main rank only)."""
        if self.ctx.is_main:
            tqdm.write(line)  # above the bar, if one is open

    def end_step(self, save: Callable[[], None]) -> None:
        """Checkpoint on cadence, never during a non-finite streak; after a signal, save and stop."""
        stop = self._stop_requested()
        if self.step % self.tc.checkpoint_every_steps == 0 and self.step < self.total_steps:
            self.save_pending = True
        if (self.save_pending or stop) and self.bad_in_row == 0:
            save()
            self.save_pending = False
        if stop:
            name = signal.Signals(stop).name
            where = ckpt.find_checkpoint(self.dir) if has_checkpoint(self.dir) else "none yet"
            raise RunInterrupted(
                f"stopped by {name} at step {self.step}; checkpoint: {where}; resume with "
                f"`vitlab {self.command} --resume {self.dir}`",
                stop,
            )

    @property
    def command(self) -> str:
        return run_command(vars(self.config))

    def _stop_requested(self) -> int:
        """The signal that asks to stop, agreed by every rank (0: none)."""
        if not self.ctx.distributed:
            return self.signal
        return int(distributed.all_reduce(torch.tensor(float(self.signal), device=self.ctx.device), "max").item())

    # -- checkpoints and results ----------------------------------------------------------------------
    def save(self, model, optimizer, meta: dict | None = None, ema: torch.nn.Module | None = None) -> None:
        """Checkpoint this step: every rank's shards under FSDP, else one plain checkpoint from the main rank."""
        from vitlab.train import sharding  # FSDP imports are heavy; only runs that checkpoint need them

        meta = {"epoch": self.epoch, "config": self.config.to_dict(), **(meta or {})}
        keep = self.tc.keep_checkpoints
        if getattr(self.tc, "strategy", "single") == "fsdp":
            sharding.save_sharded_checkpoint(self.dir, self.step, model, optimizer, meta, keep)
        elif self.ctx.is_main:
            ckpt.save_checkpoint(self.dir, self.step, model, optimizer, meta, ema, keep)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, results: dict, plot: Callable[[Path], Path]) -> dict:
        """Write results.json and the curves (main rank); returns the results with the run directory."""
        if not self.ctx.is_main:
            return results
        ckpt.write_text_atomic(self.dir / "results.json", json.dumps(results, indent=2))
        self.image("curves", plot(self.dir))
        self.log_file.hparams(results, self.step)
        self.log_file.close()
        return {**results, "run_dir": str(self.dir)}
