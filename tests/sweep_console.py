"""What a sweep run without --verbose may print: raydistill's own lines, nothing else."""

from __future__ import annotations

import re
from pathlib import Path

TRIAL_EVENT = re.compile(r"\[\d+/\d+\] \S.*: \S.*")  # raydistill.sweep.console.SweepConsole
OWN_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} raydistill(\.\w+)*: \S")  # the raydistill loggers
SUMMARY = ("report        : ", "plot          : ", "MLflow store  : ", "open the UI   : ", "trial runs    : ",
           "compare them  : ", "log           : ", "wall time     : ")


def check_quiet_console(console: str, run_dir: Path) -> None:
    """``console`` (a sweep's stdout and stderr) names the log file first, then holds only
    raydistill's messages and trial events, the report and the summary lines; what Ray and Tune
    printed is in the log file instead."""
    log_path = run_dir / "sweep.log"
    lines = console.splitlines()
    assert lines[0].startswith(f"log           : {log_path} "), lines[0]
    report = (run_dir / "results.md").read_text()
    before, found, after = console.partition(report)
    assert found, console[-4000:]
    foreign = [line for line in before.splitlines()[1:] if not (TRIAL_EVENT.fullmatch(line) or OWN_LOG.match(line))]
    foreign += [line for line in after.splitlines() if line and not line.startswith(SUMMARY)]
    assert not foreign, foreign
    log = log_path.read_text(errors="replace")
    assert "Started a local Ray instance" in log and "Configuration for experiment" in log, log[-4000:]
    assert all(line in log for line in before.splitlines()[1:] if OWN_LOG.match(line))  # copied to the log
