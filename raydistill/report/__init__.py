"""Report stage (`raydistill report`): trial records -> tables with confidence intervals, exact paired
tests (neighbouring levels, the length ablation, sources without levels against the levels), weak numbers flagged, the paper's numbers, cost per cell, plots.

Parts, in the order the data flows:

    records.py    run folder -> Trial (record.json + per-question scores); ReportError
    intervals.py  Wilson / bootstrap intervals, exact paired sign test, per-cell RNG
    published.py  the paper's published numbers and their lookup by cell
    cells.py      trials -> Cell (interval, flags, cost, published value); the paired tests
    baselines.py  per dataset the constant answer and chance; every cell tested against the constant answer
    markdown.py   results.md sections and text formatting
    tables.py     the CSV files (cells, paper layout, paired tests, trials)
    plots.py      accuracy_vs_level.png and plots/
    cli.py        write_report and `raydistill report` (main)
"""

from raydistill.report.baselines import Baseline, baseline_tests, build_baselines, chance_level
from raydistill.report.cells import (
    CEILING_FLAG,
    TRUNCATION_FLAG,
    Cell,
    Comparison,
    Cost,
    accuracy_per_usd,
    all_level_tests,
    build_cells,
    cell_cost,
    level_label,
    neighbour_tests,
    paired_scores,
    score_matrix,
    source_tests,
    teacher_tests,
    format_tests,
)
from raydistill.report.cli import main, write_report
from raydistill.report.intervals import (
    ALPHA,
    DEFAULT_N_BOOT,
    DEFAULT_SEED,
    Interval,
    PairedTest,
    accuracy_interval,
    bootstrap_accuracy,
    bootstrap_weights,
    cell_rng,
    paired_test,
    wilson_accuracy,
)
from raydistill.report.markdown import (
    TRUNCATED_MARK,
    ablation_section,
    accuracy_section,
    all_levels_section,
    baseline_section,
    cell_text,
    cost_section,
    markdown_report,
    paired_section,
    published_section,
    quality_section,
    reading,
    samples_section,
    source_section,
)
from raydistill.report.plots import draw_panel, plot_accuracy_vs_level
from raydistill.report.published import PUBLISHED_CSV, load_published, published_lookup
from raydistill.report.records import CELL_AXES, ROW_AXES, ReportError, Trial, load_records, question_scores, to_trial
from raydistill.report.tables import (
    BASELINE_COLUMNS,
    CELL_COLUMNS,
    PAIRED_COLUMNS,
    TRIAL_COLUMNS,
    baseline_table_rows,
    cell_rows,
    paired_rows,
    table_rows,
    trial_rows,
    write_csv,
)

__all__ = [
    "BASELINE_COLUMNS", "Baseline", "all_level_tests", "all_levels_section", "baseline_section", "baseline_table_rows",
    "baseline_tests", "build_baselines", "chance_level", "reading",
    "ALPHA", "CEILING_FLAG", "CELL_AXES", "CELL_COLUMNS", "DEFAULT_N_BOOT", "DEFAULT_SEED", "PAIRED_COLUMNS",
    "PUBLISHED_CSV", "ROW_AXES", "TRIAL_COLUMNS", "TRUNCATED_MARK", "TRUNCATION_FLAG",
    "Cell", "Comparison", "Cost", "Interval", "PairedTest", "ReportError", "Trial",
    "ablation_section", "accuracy_interval", "accuracy_per_usd", "accuracy_section", "bootstrap_accuracy",
    "bootstrap_weights", "build_cells", "cell_cost", "cell_rng", "cell_rows", "cell_text", "cost_section",
    "draw_panel", "level_label", "load_published", "load_records", "main", "markdown_report", "neighbour_tests",
    "paired_rows", "paired_scores", "paired_section", "paired_test", "plot_accuracy_vs_level", "published_lookup",
    "published_section", "quality_section", "question_scores", "samples_section", "score_matrix", "source_section", "source_tests", "teacher_tests", "format_tests", "table_rows", "to_trial",
    "trial_rows", "wilson_accuracy", "write_csv", "write_report",
]
