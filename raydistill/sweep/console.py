"""What a sweep prints while it runs: one line per trial event, each trial named by its axes.

    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: training
    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: step 4, loss 6.470
    [0/6] svamp chatgpt L1 cot tiny-llama seed 100: evaluating
    [1/6] svamp chatgpt L1 cot tiny-llama seed 100: done, accuracy 0.0 % (train 0.6 min, eval 0.3 min, useful 1 %)

The counter is the trials finished so far out of the sweep's; "useful" is the share of the trial's
time spent in optimizer steps and generation (`raydistill.records.TIME_STAGES`). Tune's own status table and the
log lines of every Ray worker (DeepSpeed, weight loading, Ray Data progress) are left out unless
the sweep runs with ``--verbose``.
"""

from __future__ import annotations

import re

from ray import tune

from raydistill.spec import TrialSpec

STAGE_KEY = "raydistill_stage"  # the key of the stage a trial reports (`report_stage`)


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
        print(f"[{self.finished}/{self.total}] {label}: {message}", flush=True)

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
