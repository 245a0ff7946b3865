"""What a sweep prints while it runs: one line per trial event, each trial named by its axes.

    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: training
    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: step 4, loss 6.470
    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: evaluating
    [1/6] svamp chatgpt L1 cot tiny-llama seed 100: done, accuracy 0.0 % (train 0.6 min, eval 0.3 min, useful 1 %)

The counter is the trials finished so far out of the sweep's; "useful" is the share of the trial's
time spent in optimizer steps and generation (`raydistill.records.TIME_STAGES`). Tune's own status table and the
log lines of every Ray worker (DeepSpeed, weight loading, Ray Data progress) are left out unless
the sweep runs with ``--verbose``.

Without ``--verbose`` the sweep also runs inside `quiet_console`: everything else this process
writes (Ray's and Tune's messages, MLflow's, the GGUF loader's progress bars, what Ray's own
processes print) goes to the sweep's log file, `LOG_FILE` in its run folder, named on the
console's first line; raydistill's own lines (`say`, the ``raydistill`` loggers) stay on the
console and are copied to the log.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from ray import tune

from raydistill.spec import TrialSpec

STAGE_KEY = "raydistill_stage"  # the key of the stage a trial reports (`report_stage`)
LOG_FILE = "sweep.log"  # in the run folder: all but raydistill's own lines (`quiet_console`), appended per run
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"

_console: TextIO | None = None  # the console while `quiet_console` sends this process's output to the log


def say(line: str) -> None:
    """Print one of raydistill's own lines on the console (the console also inside `quiet_console`)."""
    print(line, file=_console or sys.stdout, flush=True)


@contextmanager
def quiet_console(log_path: Path) -> Iterator[Path]:
    """Send all this process writes to stdout and stderr (file descriptors 1 and 2, so also C
    libraries, tqdm bars and the processes it starts: Ray's) to ``log_path``, appended, and keep
    raydistill's own lines on the console: `say` and the records of the ``raydistill`` loggers
    (INFO and up; every logger's records also go to the log). The console's first line names the
    log file. On exit (an error too) stdout and stderr are the console again."""
    global _console
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1) if _writes_to_fd(sys.stdout, 1) else sys.stdout
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    log = os.fdopen(log_fd, "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)} (pid {os.getpid()})\n")
    root, ours = logging.getLogger(), logging.getLogger("raydistill")
    to_log, to_console = logging.StreamHandler(log), logging.StreamHandler(console)
    for handler in (to_log, to_console):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    to_console.setLevel(logging.INFO)
    old_levels = root.level, ours.level
    root.addHandler(to_log)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    ours.addHandler(to_console)
    ours.setLevel(logging.INFO)
    _console = console
    try:
        say(f"log           : {log_path} (Ray, Tune, MLflow, DeepSpeed, model conversion; --verbose prints them here)")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield log_path
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        _console = None
        root.removeHandler(to_log)
        ours.removeHandler(to_console)
        root.setLevel(old_levels[0])
        ours.setLevel(old_levels[1])
        log.close()
        if console is not sys.stdout:
            console.close()


def _writes_to_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


def trial_label(trial: TrialSpec) -> str:
    """The trial's axes in one line: dataset, teacher, level, format, student, seed."""
    axes = trial.axes()
    level = f"L{axes['level']}" if axes["level"] else ""
    words = [axes["dataset"], axes["teacher"], level, axes["format"], axes["student"], f"seed {axes['seed']}"]
    return " ".join(w for w in words if w)


def trial_name(trial: TrialSpec) -> str:
    """Tune's name (and folder) of a trial: its axes, filesystem-safe, and the start of its hash
    (two trials may share axes and differ in training or evaluation settings)."""
    safe = re.sub(r"[^A-Za-z0-9.+_-]+", "-", trial_label(trial).replace("seed ", "s"))
    return f"{safe}-{trial.trial_hash[:8]}"


def report_stage(stage: str) -> None:
    """From inside a trial: tell the console the stage it entered (training, evaluating)."""
    tune.report({STAGE_KEY: stage})


class SweepConsole(tune.Callback):
    """Prints a line when a trial starts, enters a stage, reports a training step, ends or fails."""

    def __init__(self, labels: dict[str, str], total: int):
        self.labels = labels  # trial hash -> label
        self.total, self.finished = total, 0

    def _say(self, trial, message: str) -> None:
        label = self.labels.get(trial.config.get("trial_hash"), trial.trial_id)
        say(f"[{self.finished}/{self.total}] {label}: {message}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(STAGE_KEY):
            self._say(trial, result[STAGE_KEY])
        elif "step" in result and "train_loss" in result:
            total = f"/{result['steps_total']}" if result.get("steps_total") else ""
            self._say(trial, f"step {result['step']}{total}, loss {result['train_loss']:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        result = trial.last_result or {}
        if "accuracy" not in result:
            return
        times = ", ".join(f"{name} {result[key] / 60:.1f} min" for name, key in
                          (("train", "train_seconds"), ("eval", "eval_seconds")) if result.get(key) is not None)
        if result.get("time_wall_s") and result.get("time_useful_s") is not None:
            times += f", useful {100 * result['time_useful_s'] / result['time_wall_s']:.0f} %"
        reused = "reused its record, " if result.get("reused") else ""
        self._say(trial, f"done, {reused}accuracy {100 * result['accuracy']:.1f} %" + (f" ({times})" if times else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished += 1
        self._say(trial, f"failed (see {trial.local_path or 'the Tune folder'}/error.txt)")
