"""Sweep: a Ray Tune grid of trials, one per (student, annotation cell, seed).

    plan      expand the YAML grid into TrialSpecs (`SweepSpec.trials`), each with a content hash
    prepare   annotation cells and test sets -> Parquet once, shared by every trial that needs them
    run       Ray Tune runs `run_trial` (Ray Train SFT -> Ray Data evaluation) for every trial;
              a trial whose record already exists is not recomputed
    track     each finished trial becomes an MLflow run (see `raydistill.tracking`)
    report    results table (Markdown + CSV) and accuracy-vs-granularity plot

    raydistill sweep --config sweeps/granularity.yaml [--set train.epochs=1]

Parts: `cells` (prepare: annotation cells and test sets, cell and trial identity), `trial` (one
trial, the Tune trainable `run_trial`, and its record), `cluster` (joining the Ray cluster), `run`
(`run_sweep`: the whole sweep under Ray Tune), `cli` (`raydistill sweep` and sweeps/<name>.py).
"""

from raydistill.sweep.cells import (
                                    annotation_spec,
                                    cell_dir,
                                    digests_of_test_set,
                                    generate_cells,
                                    identify_cell,
                                    identify_trial,
                                    prepare_cells,
                                    prepare_test,
                                    replay_cell,
)
from raydistill.sweep.cli import USER_ERRORS, main, print_summary, run_and_print, script_main
from raydistill.sweep.cluster import init_ray
from raydistill.sweep.run import PLAN_FILE, TRIAL_DRIVER_RESOURCES, check_engines, run_sweep
from raydistill.sweep.trial import outside_trial_placement_group, read_record, run_trial

__all__ = [
    "PLAN_FILE", "TRIAL_DRIVER_RESOURCES", "USER_ERRORS", "annotation_spec", "cell_dir", "check_engines",
    "digests_of_test_set", "generate_cells", "identify_cell", "identify_trial", "init_ray", "main",
    "outside_trial_placement_group", "prepare_cells", "prepare_test", "print_summary", "read_record",
    "replay_cell", "run_and_print", "run_sweep", "run_trial", "script_main",
]
