"""Sweep: a Ray Tune grid of trials, one per (student, annotation cell, seed).

The `raydistill sweep` command (its description is the line above) and the entry point of
sweeps/<name>.py (`script_main`): runs the sweep, prints where its report and MLflow store are,
and prints the errors a user can fix (`USER_ERRORS`) in one line.

    raydistill sweep --config sweeps/granularity.yaml [--set train.epochs=1]
    python sweeps/granularity.py --plan     # what it will cost and detect, before it runs (raydistill plan)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from raydistill.records import TrialRecord
from raydistill.spec import SpecError, SweepSpec, load_sweep, parse_overrides
from raydistill.sweep.console import LOG_FILE, LOG_FORMAT, quiet_console, say
from raydistill.sweep.run import SweepStopped, run_sweep


def print_summary(spec: SweepSpec, records: list[TrialRecord] | None = None) -> None:
    from raydistill.tracking import ui_addresses

    run_dir = spec.run_dir
    say((run_dir / "results.md").read_text())
    say(f"report        : {run_dir / 'results.md'} (CSV: results.csv, results_table.csv, paired_tests.csv)")
    say(f"plot          : {run_dir / 'accuracy_vs_level.png'} (one panel per dataset and student in plots/)")
    say(f"MLflow store  : {spec.tracking_uri}")
    say(f"open the UI   : LITELLM_LOCAL_MODEL_COST_MAP=True mlflow ui --backend-store-uri {spec.tracking_uri} --port 5000")
    pages = ui_addresses(spec.tracking_uri, spec.name, [r.trial_hash for r in records] if records is not None else None)
    say(f"trial runs    : {pages['runs']}")
    say(f"compare them  : {pages['compare']}")


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message already says what to fix: the sweep CLI prints them in one line."""
    from raydistill.annotate import CacheWriteError, SpendCapReached
    from raydistill.datasets import CellNotReleased, DataUnavailable, MalformedData
    from raydistill.evaluate import EngineError
    from raydistill.prompts import PromptError
    from raydistill.students import StudentError
    from raydistill.train import TrainInputError

    return (SpecError, StudentError, DataUnavailable, CellNotReleased, MalformedData, PromptError,
            EngineError, TrainInputError, CacheWriteError, SpendCapReached)


USER_ERRORS = _user_errors()


def main(argv: list[str], prog: str = "raydistill sweep", default_config: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=default_config is None, default=default_config,
                        help="sweep YAML (see sweeps/*.yaml)" + (f"; default {default_config}" if default_config else ""))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=1 --set levels=[1,6]")
    parser.add_argument("--output-dir", default=os.environ.get("RAYDISTILL_OUTPUT_DIR"),
                        help="parent folder of the sweep's outputs (default: $RAYDISTILL_OUTPUT_DIR, "
                             "else the config's output_dir)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Tune's status table, every Ray worker's log lines and the other libraries' "
                             "output (else in the run folder's sweep.log), and start Ray's dashboard with a local "
                             "cluster")
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: print and write the sweep's plan (plan.json, plan.md: teacher requests, "
                             "tokens and dollars, training and evaluation tokens and time, power), as raydistill plan")
    from raydistill.plan.cli import add_options

    add_options(parser)
    args = parser.parse_args(argv)
    from raydistill.plan.compute import PlanInputError

    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        spec = load_sweep(args.config, overrides)
        if args.plan:
            from raydistill.plan import run_plan

            run_plan(spec, args.device, args.throughput, args.discordance)
        else:
            run_and_print(spec, args.verbose)
    except (*USER_ERRORS, PlanInputError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except SweepStopped as err:
        print(f"stopped: {' '.join(str(err).split())}", file=sys.stderr)
        return 130
    return 0


def script_main(script: str) -> int:
    """Entry point of sweeps/<name>.py: runs sweeps/<name>.yaml unless --config names another."""
    path = Path(script).resolve()
    return main(sys.argv[1:], prog=path.name, default_config=str(path.with_suffix(".yaml")))


def run_and_print(spec: SweepSpec, verbose: bool = False) -> list[TrialRecord]:
    """Run the sweep and print its summary. Without ``verbose`` the console shows raydistill's own
    lines only; the rest goes to the run folder's log file (`raydistill.sweep.console.quiet_console`)."""
    started = time.perf_counter()
    with contextlib.nullcontext() if verbose else quiet_console(spec.run_dir / LOG_FILE):
        if verbose:
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        records = run_sweep(spec, verbose)
        print_summary(spec, records)
        if not verbose:
            say(f"log           : {spec.run_dir / LOG_FILE}")
        say(f"wall time     : {time.perf_counter() - started:.0f} s for {len(records)} trials")
    return records
