"""Report stage: intervals, exact paired level tests with Holm, weak-number flags, seeds,
published numbers, cost, CLI.

Run folders are built from real record.json files and real Parquet predictions of simulated
students whose per-question correctness is drawn from known probabilities.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import report, stats
from raydistill.schemas import PREDICTION_SCHEMA

N_BOOT = 500


def write_trial(run_dir: Path, correct, *, dataset="svamp", teacher="chatgpt", level="1", fmt="cot",
                student="tiny-llama", seed="0", cell="absent", num_workers=1, num_actors=1,
                train_seconds=10.0, eval_seconds=4.0, truncated=0, target_ceiling=0.99, extracted=None,
                timings=None, gold=None, ids=None, empty=None, think_cut=None) -> dict:
    """A finished trial: predictions Parquet (one row per question and sample) + record.json.

    ``correct`` is (n_questions,) or (n_questions, n_samples) of bools; ``truncated`` is how many
    of the rows hit max_new_tokens (the first ones) and ``empty`` how many are empty (the last ones; None:
    a record from before empty generations were counted); ``cell`` is a record's "cell" value, or
    "absent" for an older record without the key; ``gold`` gives each question's gold answer (default
    q % 10 + 1 for question q: ten answers, each 10 % of the questions) and ``ids`` the question ids
    (default q0, q1, ...); ``extracted`` (the shape of
    ``correct``) gives each row's extracted answer (default the gold on a correct row and "0" on a wrong one).
    """
    correct = np.asarray(correct, dtype=bool).reshape(len(correct), -1)
    axes = {"dataset": dataset, "teacher": teacher, "level": level, "format": fmt, "student": student,
            "seed": str(seed)}
    trial_hash = hashlib.sha256(json.dumps(axes, sort_keys=True).encode()).hexdigest()[:16]
    trial_dir = run_dir / "trials" / trial_hash
    trial_dir.mkdir(parents=True)
    golds = [str(q % 10 + 1) for q in range(correct.shape[0])] if gold is None else [str(g) for g in gold]
    answers = np.where(correct, np.array(golds, dtype=object)[:, None], "0") if extracted is None else np.asarray(
        extracted, dtype=object).reshape(correct.shape)
    ids = [f"q{q}" for q in range(correct.shape[0])] if ids is None else list(ids)
    rows = [{"eval_hash": trial_hash, "question_id": ids[q], "prompt": "p", "generation": "g",
             "extracted": answers[q][s], "gold": golds[q], "correct": bool(ok), "tokens_generated": 5, "truncated": False,
             "empty": False}
            for q in range(correct.shape[0]) for s, ok in enumerate(correct[q])]
    for row in rows[:truncated]:
        row.update(truncated=True, tokens_generated=64)
    for row in rows[len(rows) - (empty or 0):]:
        row.update(generation="", empty=True)
    predictions = trial_dir / "predictions.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), predictions)
    record = {
        "trial_hash": trial_hash, "axes": axes,
        "train_spec": {"num_workers": num_workers}, "eval_spec": {"num_actors": num_actors},
        "model_path": str(trial_dir / "model"), "predictions_path": str(predictions),
        "train_history": [{"step": 1, "loss": 1.0, "lr": 5e-5}],
        "metrics": {"accuracy": float(correct.mean()), "n_test": int(correct.shape[0]),
                    "extraction_failure_rate": 0.0, "truncation_rate": truncated / len(rows),
                    "target_ceiling": target_ceiling, "max_new_tokens": 64,
                    "mean_generated_tokens": 5.0, "train_examples": 8,
                    "train_truncated": 0, "train_over_cutoff": 0, "train_padding_fraction": 0.1,
                    "train_steps": 2, "final_train_loss": 0.5, "train_seconds": train_seconds,
                    "eval_seconds": eval_seconds,
                    **({} if empty is None else {"empty_rate": empty / len(rows)}),
                    **({} if think_cut is None else {"think_unfinished_rate": think_cut / len(rows),
                                                     "mean_think_tokens": 40.0, "mean_answer_tokens": 8.0})},
    }
    if cell != "absent":
        record["cell"] = cell
    if timings is not None:
        record["timings"] = timings
    (trial_dir / "record.json").write_text(json.dumps(record))
    return record


def draws(p: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_report(run_dir: Path, plots: bool = False) -> dict[str, Path]:
    return report.write_report(report.load_records(run_dir), run_dir, n_boot=N_BOOT, plots=plots)


# --------------------------------------------------------------------------- bootstrap


def test_ci_contains_estimate_and_shrinks_with_more_questions():
    widths = {}
    for n in (100, 2000):
        interval = report.bootstrap_accuracy(draws(0.6, n, seed=n), N_BOOT, np.random.default_rng(0))
        assert interval.low <= interval.estimate <= interval.high
        assert interval.estimate == pytest.approx(draws(0.6, n, seed=n).mean())
        widths[n] = interval.high - interval.low
    # Width scales like 1/sqrt(n): sqrt(100/2000) = 0.22.
    assert 0.12 < widths[2000] / widths[100] < 0.35


def test_ci_covers_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    p, n, repeats = 0.3, 150, 300
    covered = 0
    for _ in range(repeats):
        interval = report.bootstrap_accuracy(rng.random(n) < p, 400, rng)
        covered += interval.low <= p <= interval.high
    assert 0.88 <= covered / repeats <= 0.99


def test_ci_over_seeds_averages_seeds_and_handles_missing_questions():
    scores = np.array([[1, 1, 0, 0], [1, 0, 0, np.nan]], dtype=float)
    interval = report.bootstrap_accuracy(scores, N_BOOT, np.random.default_rng(0))
    assert interval.estimate == pytest.approx((0.5 + 1 / 3) / 2)
    assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0


def test_two_stage_bootstrap_covers_training_variance():
    """Seeds whose accuracies differ far more than the question sample explains (0.2 vs 0.8 on the
    same 300 questions): the questions-only interval stays near ±0.04 around 0.5, the two-stage one
    spans most of the seeds' range, since a replicate may draw the same seed twice."""
    scores = np.stack([draws(0.2, 300, 1), draws(0.8, 300, 2)]).astype(float)
    questions = report.bootstrap_accuracy(scores, N_BOOT, np.random.default_rng(0))
    both = report.bootstrap_accuracy(scores, N_BOOT, np.random.default_rng(0), resample_seeds=True)
    assert questions.method == "bootstrap" and both.method == "bootstrap-seeds"
    assert both.estimate == questions.estimate
    assert questions.high - questions.low < 0.1 and both.low < 0.3 and both.high > 0.7


def test_paired_test_is_exact_on_the_discordant_questions():
    """Hand-computed McNemar cases: the percentile bootstrap called 5 and 4 one-way discordant
    questions out of 40 'p = 0.008' and 'p = 0.030'; the exact test says 0.0625 and 0.125."""
    a = np.zeros(40)
    b = a.copy()
    b[:5] = 1  # 5 questions right only at the higher level
    five = report.paired_test(a, b)
    assert (five.n_b_better, five.n_a_better, five.p_value) == (5, 0, 0.0625)
    assert five.diff == pytest.approx(5 / 40) and five.min_detectable == pytest.approx(6 / 40)
    b[5] = 1
    assert report.paired_test(a, b).p_value == 0.03125  # 6 all one way
    a[10:14] = 1  # 4 the other way: 6 vs 4 discordant, 2 * P(X <= 4 | 10, 0.5) = 0.7539
    assert report.paired_test(a, b).p_value == pytest.approx(2 * (1 + 10 + 45 + 120 + 210) / 1024)
    better = report.paired_test(draws(0.3, 300, 1).astype(float), draws(0.7, 300, 2).astype(float))
    assert better.p_value < 1e-6 and 0.3 < better.diff < 0.5
    same = draws(0.5, 300, 3)
    identical = report.paired_test(same, same)
    assert identical.p_value == 1.0 and identical.diff == 0 and identical.n_b_better == identical.n_a_better == 0


def test_one_seed_intervals_are_wilson_and_never_degenerate():
    none_right = report.accuracy_interval(np.zeros((1, 40)))
    assert none_right.method == "wilson" and (none_right.estimate, none_right.low) == (0.0, 0.0)
    assert none_right.high == pytest.approx(0.0876, abs=1e-4)  # Wilson upper bound for 0/40
    all_right = report.accuracy_interval(np.ones((1, 40)))
    assert all_right.high == 1.0 and all_right.low == pytest.approx(1 - 0.0876, abs=1e-4)
    half = report.accuracy_interval(np.array([[1, 0] * 20]))
    assert half.low < 0.5 < half.high and half.method == "wilson"


def test_several_seeds_use_the_bootstrap_and_widen_a_degenerate_one():
    rng = np.random.default_rng(0)
    mixed = report.accuracy_interval(np.stack([draws(0.5, 100, 1), draws(0.5, 100, 2)]).astype(float), N_BOOT, rng)
    assert mixed.method == "bootstrap-seeds" and mixed.low < mixed.estimate < mixed.high
    samples = report.accuracy_interval(np.array([[0.5, 1.0, 0.0, 0.5] * 10]), N_BOOT, rng)  # one seed, 2 samples
    assert samples.method == "bootstrap" and samples.low < samples.estimate < samples.high
    zeros = report.accuracy_interval(np.zeros((3, 40)), N_BOOT, rng)
    assert zeros.method == "bootstrap-seeds+wilson" and zeros.low == 0.0 and zeros.high == pytest.approx(0.0876, abs=1e-4)


# --------------------------------------------------------------------------- run folder


def test_report_tables_paired_tests_and_plots(tmp_path):
    n = 300
    write_trial(tmp_path, draws(0.3, n, 1), level="1")
    write_trial(tmp_path, draws(0.8, n, 2), level="2")
    write_trial(tmp_path, draws(0.8, n, 2), level="3")  # identical predictions to level 2
    write_trial(tmp_path, draws(0.5, n, 4), teacher="human", level="")
    paths = run_report(tmp_path, plots=True)

    md = paths["markdown"].read_text()
    records = [r.model_dump() for r in report.load_records(tmp_path)]
    row = next(line for line in md.splitlines() if line.startswith("| svamp | chatgpt | cot | tiny-llama"))
    for record in (r for r in records if r["axes"]["teacher"] == "chatgpt"):
        assert f"{100 * record['metrics']['accuracy']:.1f} [" in row
    assert "| L1 | L2 | L3 | no level |" in md

    rows = read_csv(paths["paired_csv"])
    tests = {(t["level_a"], t["level_b"]): t for t in rows if t["family"] == "levels"}
    assert set(tests) == {("1", "2"), ("2", "3")}  # the level-less cell is in the other family
    assert {(t["level_a"], t["teacher_b"]) for t in rows if t["family"] == "sources"} == {
        ("1", "human"), ("2", "human"), ("3", "human")}
    first = tests[("1", "2")]
    assert float(first["p_value"]) < 0.01 and int(first["n_b_better"]) > int(first["n_a_better"])
    assert float(first["p_holm"]) == pytest.approx(min(1.0, 2 * float(first["p_value"])))  # Holm over 2 tests
    assert float(first["min_detectable_diff"]) == pytest.approx(6 / n)
    assert float(tests[("2", "3")]["p_value"]) == 1.0 and float(tests[("2", "3")]["diff"]) == 0
    assert float(tests[("2", "3")]["p_holm"]) == 1.0
    assert tests[("1", "2")]["paired_on"] == "question_id+seed" and tests[("1", "2")]["n_questions"] == str(n)

    cells = read_csv(paths["csv"])
    assert len(cells) == 4
    for c in cells:
        assert float(c["ci_low"]) <= float(c["accuracy"]) <= float(c["ci_high"])
    table = read_csv(paths["table_csv"])
    assert {r["teacher"] for r in table} == {"chatgpt", "human"}
    assert next(r for r in table if r["teacher"] == "human")["no_level"] != ""
    assert len(read_csv(paths["trials_csv"])) == 4
    assert paths["plot"].stat().st_size > 1000
    assert paths["plot:svamp_tiny-llama"].stat().st_size > 1000


def test_a_padded_cell_is_compared_with_both_of_its_levels(tmp_path):
    """The length ablation: L1+pad5 is tested against L1 and against L5 (right-hand minus left),
    in the same Holm family as the neighbouring levels."""
    n = 200
    write_trial(tmp_path, draws(0.3, n, 1), level="1")
    write_trial(tmp_path, draws(0.6, n, 2), level="5")
    padded = draws(0.3, n, 1)
    padded[:12] = ~padded[:12]  # 12 discordant questions against L1
    write_trial(tmp_path, padded, level="1+pad5")
    paths = run_report(tmp_path)

    tests = {(t["level_a"], t["level_b"]): t for t in read_csv(paths["paired_csv"]) if t["family"] == "levels"}
    assert set(tests) == {("1", "5"), ("1", "1+pad5"), ("5", "1+pad5")}
    to_l1 = tests[("1", "1+pad5")]
    assert int(to_l1["n_a_better"]) + int(to_l1["n_b_better"]) == 12
    assert float(to_l1["diff"]) == pytest.approx(padded.mean() - draws(0.3, n, 1).mean())
    assert float(tests[("5", "1+pad5")]["diff"]) == pytest.approx(padded.mean() - draws(0.6, n, 2).mean())
    raw = [float(t["p_value"]) for t in tests.values()]
    assert [float(t["p_holm"]) for t in tests.values()] == pytest.approx(stats.holm_adjust(raw))  # one family of 3
    md = paths["markdown"].read_text()
    assert "L1 → L1+pad5" in md and "L5 → L1+pad5" in md


def test_sources_without_levels_are_tested_against_every_level_in_their_own_family(tmp_path):
    """Human and answer-only against each level of the leveled teacher (Δ = source − level) and
    against each other, Holm-adjusted over those tests only; padded cells and other students are
    left out of this family."""
    n = 300
    levels = {"1": draws(0.3, n, 1), "2": draws(0.6, n, 2)}
    for level, correct in levels.items():
        write_trial(tmp_path, correct, level=level)
    write_trial(tmp_path, draws(0.3, n, 1), level="1+pad2")
    human, answer_only = draws(0.45, n, 3), draws(0.1, n, 4)
    write_trial(tmp_path, human, teacher="human", level="")
    write_trial(tmp_path, answer_only, teacher="answer_only", level="")
    write_trial(tmp_path, draws(0.5, n, 5), teacher="human", level="", student="other")  # no level to pair with
    paths = run_report(tmp_path)

    rows = read_csv(paths["paired_csv"])
    sources = {(t["teacher"], t["level_a"], t["teacher_b"]): t for t in rows if t["family"] == "sources"}
    assert set(sources) == {("chatgpt", "1", "human"), ("chatgpt", "2", "human"), ("chatgpt", "1", "answer_only"),
                            ("chatgpt", "2", "answer_only"), ("answer_only", "", "human")}
    assert {t["student"] for t in sources.values()} == {"tiny-llama"}
    for (teacher, level, source), test in sources.items():
        a = levels[level] if teacher == "chatgpt" else answer_only
        b = human if source == "human" else answer_only
        assert float(test["diff"]) == pytest.approx(b.mean() - a.mean())
        assert int(test["n_b_better"]) == int((b & ~a).sum()) and int(test["n_a_better"]) == int((a & ~b).sum())
    raw = [float(t["p_value"]) for t in sources.values()]
    assert [float(t["p_holm"]) for t in sources.values()] == pytest.approx(stats.holm_adjust(raw))  # 5, not 8
    levels_family = [t for t in rows if t["family"] == "levels"]
    assert len(levels_family) == 3  # L1 → L2, L1 → L1+pad2, L2 → L1+pad2
    assert [float(t["p_holm"]) for t in levels_family] == pytest.approx(
        stats.holm_adjust([float(t["p_value"]) for t in levels_family]))
    md = paths["markdown"].read_text()
    assert "## Sources without levels against the levels" in md
    assert "chatgpt L2 → answer_only" in md and "answer_only → human" in md


def test_a_padded_cell_is_drawn_beside_its_level_not_as_a_level_less_line(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_trial(tmp_path, draws(0.3, 100, 1), level="1")
    write_trial(tmp_path, draws(0.4, 100, 2), level="1+pad5")
    write_trial(tmp_path, draws(0.5, 100, 3), teacher="human", level="")
    trials = [report.to_trial(r, tmp_path) for r in report.load_records(tmp_path)]
    cells = report.build_cells(trials, [], N_BOOT, 0)
    fig, ax = plt.subplots()
    report.draw_panel(ax, ("svamp", "tiny-llama"), cells)
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert "chatgpt/cot L1+pad5" in labels and "human/cot (no level)" in labels
    assert "chatgpt/cot (no level)" not in labels


def test_truncated_padded_and_level_less_cells_carry_the_mark_in_the_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_trial(tmp_path, draws(0.3, 100, 1), level="1")
    write_trial(tmp_path, draws(0.4, 100, 2), level="1+pad5", truncated=60)
    write_trial(tmp_path, draws(0.5, 100, 3), teacher="human", level="", truncated=30)
    trials = [report.to_trial(r, tmp_path) for r in report.load_records(tmp_path)]
    cells = report.build_cells(trials, [], N_BOOT, 0)
    fig, ax = plt.subplots()
    report.draw_panel(ax, ("svamp", "tiny-llama"), cells)
    labels = ax.get_legend_handles_labels()[1]
    marks = [(text.get_text(), text.xy) for text in ax.texts]
    plt.close(fig)
    padded = next(c for c in cells if c.level == "1+pad5")
    assert marks == [("†", (1.15, pytest.approx(100 * padded.accuracy)))]  # the diamond only, not L1
    assert "† > 5 % truncated" in labels and "human/cot (no level) †" in labels


def test_time_section_sums_stages_and_gives_the_useful_share(tmp_path):
    first = {"queued": 5.0, "train_start": 10.0, "optimizer_steps": 60.0, "eval_first_batch": 20.0,
             "generation": 25.0, "eval_generating": 10.0, "other": 0.0, "wall": 100.0, "useful": 85.0,
             "optimizer_cpu": 45.0, "generation_cpu": 24.5, "useful_cpu": 69.5}
    second = {"train_start": 30.0, "optimizer_steps": 20.0, "eval_first_batch": 40.0, "generation": 5.0,
              "wall": 100.0, "useful": 25.0}
    write_trial(tmp_path, draws(0.5, 40, 1), level="1", timings=first)
    write_trial(tmp_path, draws(0.5, 40, 2), level="2", timings=second)
    write_trial(tmp_path, draws(0.5, 40, 3), level="3")  # an older record: no breakdown
    paths = run_report(tmp_path)
    md = paths["markdown"].read_text()
    section = md.split("## Where the time went")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in section.splitlines() if line.startswith("| ")}
    assert rows["train_start"][1:4] == ["40.0", "20.0", "20.0 %"]  # 40 of the 200 s of trial time
    assert rows["optimizer_steps"][1:4] == ["80.0", "40.0", "40.0 %"]
    assert rows["queued"][1:4] == ["5.0", "5.0", ""]  # before the trials' start: no share of their time
    assert "Useful share (optimizer steps + generation, of trial time): 55.0 % (110.0 of 200.0 s, 2 trials)" in section
    assert "1 of 3 trials were recorded without a time breakdown" in section
    # CPU seconds are not stages of the trials' time: no row, a line of their own (the trial that has them)
    assert not {"optimizer_cpu", "generation_cpu", "useful_cpu"} & set(rows)
    assert "Useful CPU time: 69.5 CPU-seconds (45.0 in optimizer steps, 24.5 generating; 1 of 2 timed trials)" in section
    by_level = {row["level"]: row for row in read_csv(paths["trials_csv"])}
    assert float(by_level["1"]["time_generation_s"]) == 25.0 and by_level["3"]["time_generation_s"] == ""


def test_seeds_are_aggregated(tmp_path):
    accuracies = []
    for seed in range(3):
        correct = draws(0.4 + 0.1 * seed, 200, 10 + seed)
        accuracies.append(correct.mean())
        write_trial(tmp_path, correct, seed=str(seed))
    paths = run_report(tmp_path)
    (cell,) = read_csv(paths["csv"])
    assert cell["n_seeds"] == "3" and cell["seeds"] == "0 1 2"
    assert float(cell["accuracy"]) == pytest.approx(np.mean(accuracies))
    assert float(cell["ci_low"]) < np.mean(accuracies) < float(cell["ci_high"])
    assert cell["ci_method"] == "bootstrap-seeds"
    # The interval resamples seeds, then questions: wider than the questions-only bootstrap of the
    # same scores, which averages the seeds' differences away.
    matrix = np.stack([draws(0.4 + 0.1 * seed, 200, 10 + seed) for seed in range(3)]).astype(float)
    questions_only = report.bootstrap_accuracy(matrix, N_BOOT, np.random.default_rng(0))
    assert float(cell["ci_high"]) - float(cell["ci_low"]) > questions_only.high - questions_only.low
    assert [float(a) for a in cell["seed_accuracies"].split()] == pytest.approx(accuracies, abs=1e-4)
    assert float(cell["seed_min"]) == pytest.approx(min(accuracies))
    assert float(cell["seed_sd"]) == pytest.approx(np.std(accuracies, ddof=1))
    md = paths["markdown"].read_text()
    assert f"{100 * np.mean(accuracies):.1f} [" in md and " ×3" in md
    seeds = md[md.index("## Seeds: how far training variance moves a cell"):]
    assert " / ".join(f"{100 * a:.1f}" for a in accuracies) in seeds.splitlines()[4]


def test_several_samples_per_question_use_the_mean_per_question(tmp_path):
    correct = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], dtype=bool)  # 4 questions x 2 samples
    record = write_trial(tmp_path, correct)
    scores = report.question_scores(Path(record["predictions_path"]))
    assert scores == {"q0": 1.0, "q1": 0.5, "q2": 0.0, "q3": 0.5}
    (cell,) = read_csv(run_report(tmp_path)["csv"])
    assert float(cell["accuracy"]) == pytest.approx(0.5) and cell["n_questions_ci"] == "4"


def test_pass_at_k_and_maj_at_k_per_cell_with_intervals(tmp_path):
    """Three samples per question: pass@3 and maj@3 by hand; a one-sample cell has neither."""
    pattern = [([1, 0, 0], ["1", "2", "2"]),  # one right, majority wrong: pass 1, maj 0
               ([1, 1, 0], ["1", "1", "3"]),  # majority right: pass 1, maj 1
               ([0, 0, 0], [None, None, "4"]),  # none right: 0, 0
               ([0, 1, 0], [None, "1", None])]  # the only vote is right: 1, 1
    correct = np.array([c for c, _ in pattern] * 25, dtype=bool)  # 100 questions
    extracted = [e for _, e in pattern] * 25
    write_trial(tmp_path, correct, level="1", extracted=extracted)
    write_trial(tmp_path, draws(0.5, 100, 1), level="2")
    paths = run_report(tmp_path)

    sampled, single = read_csv(paths["csv"])
    assert sampled["samples_per_question"] == "3" and float(sampled["accuracy"]) == pytest.approx(4 / 12)
    assert float(sampled["pass_at_k"]) == pytest.approx(0.75) and float(sampled["maj_at_k"]) == pytest.approx(0.5)
    for name in ("pass_at_k", "maj_at_k"):
        assert float(sampled[f"{name}_ci_low"]) < float(sampled[name]) < float(sampled[f"{name}_ci_high"])
    assert single["samples_per_question"] == single["pass_at_k"] == single["maj_at_k"] == ""
    md = paths["markdown"].read_text()
    assert "## Several samples per question: pass@k and maj@k" in md
    assert "| 3 | 33.3 [" in md and "| 75.0 [" in md and "| 50.0 [" in md


def test_truncated_cells_are_marked_in_table_csv_and_flags(tmp_path):
    write_trial(tmp_path, draws(0.5, 40, 1), level="1", truncated=1, empty=6)  # 2.5 %: not marked; 15 % empty
    write_trial(tmp_path, draws(0.5, 40, 2), level="5", truncated=31, target_ceiling=0.86, empty=0,
                think_cut=4)  # 77.5 %; a thinking student, 10 % cut inside its think block
    paths = run_report(tmp_path, plots=True)
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| svamp | chatgpt | cot | tiny-llama |"))
    l1, l5 = row.split(" | ")[4], row.split(" | ")[5]
    assert "†" not in l1 and "†" in l5
    assert "† more than 5 % of the cell's generations hit max_new_tokens" in md
    cells = {c["level"]: c for c in read_csv(paths["csv"])}
    assert float(cells["5"]["truncation_rate"]) == pytest.approx(31 / 40)
    assert "77.5 % of generations cut at max_new_tokens" in cells["5"]["flags"]
    assert "target ceiling 86.0 %" in cells["5"]["flags"] and cells["1"]["flags"] == "15.0 % of generations empty"
    assert float(cells["1"]["empty_rate"]) == pytest.approx(6 / 40) and float(cells["5"]["empty_rate"]) == 0
    weak = md[md.index("## Weak numbers"):]
    assert "| truncated | empty |" in weak and "| 2.5 % | 15.0 % |" in weak
    assert "| think cut | think tokens | answer tokens |" in weak and "| 10.0 % | 40 | 8 |" in weak
    assert "10.0 % of generations ended inside their think block (no answer)" in cells["5"]["flags"]
    assert float(cells["5"]["mean_think_tokens"]) == 40 and cells["1"]["mean_think_tokens"] == ""
    assert "- svamp/chatgpt/cot/tiny-llama L5: 77.5 % of generations cut" in md
    table = read_csv(paths["table_csv"])[0]
    assert table["L5"].endswith("†") and not table["L1"].endswith("†")


def test_teachers_and_formats_at_one_level_are_tested_in_families_of_their_own(tmp_path):
    n = 200
    cot = draws(0.3, n, 1)
    write_trial(tmp_path, cot, teacher="chatgpt", level="3")
    write_trial(tmp_path, draws(0.3, n, 2), teacher="chatgpt", level="1")
    gemini = cot.copy()
    gemini[:30] = True  # right on 30 more questions where chatgpt is wrong or right
    write_trial(tmp_path, gemini, teacher="gemini", level="3")
    write_trial(tmp_path, draws(0.3, n, 3), teacher="gemini", level="6")  # no chatgpt L6: no pair
    write_trial(tmp_path, cot, teacher="chatgpt", fmt="bsm", level="3")  # the same predictions as CoT
    write_trial(tmp_path, draws(0.3, n, 4), teacher="chatgpt", fmt="rar", level="3")
    paths = run_report(tmp_path)
    tests = read_csv(paths["paired_csv"])
    teachers = [t for t in tests if t["family"] == "teachers"]
    assert [(t["teacher"], t["level_a"], t["teacher_b"], t["level_b"]) for t in teachers] == [("chatgpt", "3", "gemini", "3")]
    [t] = teachers
    gained = int((~cot[:30].astype(bool)).sum())
    assert (int(t["n_b_better"]), int(t["n_a_better"])) == (gained, 0)
    assert float(t["diff"]) == pytest.approx(gained / n)
    formats = [t for t in tests if t["family"] == "formats"]
    assert sorted((t["format"], t["level_a"], t["level_b"]) for t in formats) == [("bsm", "3", "3"), ("cot", "3", "3"), ("cot", "3", "3")]
    same = next(t for t in formats if t["format"] == "cot" and float(t["diff"]) == 0)
    assert same["p_value"] == "1.0" and same["reading"].startswith("not significant, Δ in [")
    md = paths["markdown"].read_text()
    assert "## Teachers at the same level: exact paired tests" in md and "chatgpt L3 → gemini L3" in md
    assert "## Formats at the same level: exact paired tests" in md and "cot L3 → bsm L3" in md and "cot L3 → rar L3" in md


def test_unpaired_seeds_pair_on_questions_only(tmp_path):
    write_trial(tmp_path, draws(0.2, 100, 1), level="1", seed="0")
    write_trial(tmp_path, draws(0.9, 100, 2), level="2", seed="1")
    (test,) = [t for t in read_csv(run_report(tmp_path)["paired_csv"]) if t["family"] == "levels"]
    assert test["paired_on"] == "question_id" and test["n_seeds_paired"] == "0"


def test_published_numbers_next_to_matching_rows(tmp_path):
    write_trial(tmp_path, draws(0.5, 100, 1), dataset="gsm8k", student="gemma-2b", level="1")
    write_trial(tmp_path, draws(0.6, 100, 2), dataset="gsm8k", student="llama-3.2-3b", level="4")
    write_trial(tmp_path, draws(0.6, 100, 3), dataset="gsm8k", student="llama-3.2-3b", level="2")
    paths = run_report(tmp_path)
    md = paths["markdown"].read_text()
    gemma = next(line for line in md.splitlines() if line.startswith("| gsm8k | chatgpt | cot | gemma-2b |"))
    assert "paper 49.66" in gemma
    cells = {(c["student"], c["level"]): c for c in read_csv(paths["csv"])}
    assert float(cells[("gemma-2b", "1")]["published_accuracy"]) == pytest.approx(0.4966)
    assert cells[("llama-3.2-3b", "4")]["published_kind"] == "best_level"
    assert float(cells[("llama-3.2-3b", "4")]["published_accuracy"]) == pytest.approx(0.6348)
    assert cells[("llama-3.2-3b", "2")]["published_accuracy"] == ""
    assert "| gsm8k | chatgpt | cot | gemma-2b | L1 |" in md  # the side-by-side section


def test_published_numbers_absent_gives_one_line(tmp_path):
    write_trial(tmp_path, draws(0.5, 50, 1), dataset="svamp")
    md = run_report(tmp_path)["markdown"].read_text()
    section = md.split("## Published numbers side by side\n\n")[1].split("\n\n")[0]
    assert section.startswith("No cell matches a published number") and "\n" not in section


def test_published_csv_is_well_formed():
    from raydistill.students import STUDENTS

    rows = report.load_published()
    assert len(rows) == 15
    for row in rows:
        if row["kind"] != "ablation":
            assert row["student"] in STUDENTS and row["teacher"] == "chatgpt" and row["dataset"] == "gsm8k"
    assert {r["variant"] for r in rows if r["kind"] == "ablation"} == {"level1", "level1+padding", "level5"}


def test_cost_per_cell(tmp_path):
    annotation = {"cost_usd": 2.5, "tokens_in": 12000, "tokens_out": 34000, "requests_sent": 100,
                  "teacher_accuracy": 0.9}
    generated = {"hash": "cellA", "dir": "cells/cellA", "source": "generated", "annotation": annotation}
    for seed in ("0", "1"):  # two seeds share one annotation cell: its cost counts once
        write_trial(tmp_path, draws(0.5, 100, int(seed)), level="1", seed=seed, cell=generated,
                    num_workers=2, num_actors=3, train_seconds=10.0, eval_seconds=4.0)
    write_trial(tmp_path, draws(0.5, 100, 5), level="2",
                cell={"hash": "cellB", "dir": "cells/cellB", "source": "replay", "annotation": None})
    write_trial(tmp_path, draws(0.5, 100, 6), level="3")  # older record without "cell"
    paths = run_report(tmp_path)
    cells = {c["level"]: c for c in read_csv(paths["csv"])}

    gen = cells["1"]
    assert gen["teacher_source"] == "generated" and float(gen["teacher_cost_usd"]) == 2.5
    assert gen["teacher_tokens_in"] == "12000" and gen["teacher_tokens_out"] == "34000"
    assert float(gen["train_seconds"]) == 20.0 and float(gen["train_worker_seconds"]) == 40.0
    assert float(gen["eval_seconds"]) == 8.0 and float(gen["eval_actor_seconds"]) == 24.0
    assert float(gen["accuracy_pct_per_usd"]) == pytest.approx(100 * float(gen["accuracy"]) / 2.5)
    assert cells["2"]["teacher_source"] == "replayed" and cells["2"]["accuracy_pct_per_usd"] == ""
    assert cells["3"]["teacher_source"] == "unknown" and cells["3"]["teacher_cost_usd"] == ""

    md = paths["markdown"].read_text()
    assert "$2.50" in md and "12,000 / 34,000" in md and "replayed" in md
    assert f"{100 * float(gen['accuracy']) / 2.5:.1f}" in md


def test_report_is_reproducible(tmp_path):
    write_trial(tmp_path, draws(0.4, 120, 1), level="1")
    write_trial(tmp_path, draws(0.6, 120, 2), level="2")
    first = {k: run_report(tmp_path)[k].read_text() for k in ("csv", "paired_csv", "markdown")}
    second = {k: run_report(tmp_path)[k].read_text() for k in ("csv", "paired_csv", "markdown")}
    assert first == second


def test_moved_run_folder_finds_predictions_in_the_trial_folder(tmp_path):
    record = write_trial(tmp_path, draws(0.5, 80, 1))
    record["predictions_path"] = "/nonexistent/predictions.parquet"
    (tmp_path / "trials" / record["trial_hash"] / "record.json").write_text(json.dumps(record))
    (cell,) = read_csv(run_report(tmp_path)["csv"])
    assert cell["n_questions_ci"] == "80" and cell["ci_low"] != ""


# --------------------------------------------------------------------------- CLI


def test_cli_prints_the_table(tmp_path, capsys):
    from raydistill.cli import main  # what `python -m raydistill.cli` runs; in-process to stay fast

    write_trial(tmp_path, draws(0.4, 60, 1), level="1")
    assert main(["report", str(tmp_path), "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "| dataset | teacher | format | student | L1 |" in out
    assert (tmp_path / "results.md").is_file() and (tmp_path / "accuracy_vs_level.png").is_file()


def test_cli_without_trials_fails_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "raydistill.cli", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "no finished trials" in lines[0]


# --------------------------------------------------------------------------- baselines and Δ intervals


def _counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """(both right, only b, only a, neither) of two 0/1 vectors: b is the first measurement."""
    a, b = a.astype(bool), b.astype(bool)
    return int((a & b).sum()), int((b & ~a).sum()), int((a & ~b).sum()), int((~a & ~b).sum())


def test_svamp_constant_answer_is_1_and_scores_25_of_300():
    """The project's SVAMP test set: always answering the most frequent gold answer, "1", is right on
    25 of the 300 questions (8.33 %). Counted here from the test set itself."""
    from collections import Counter

    from raydistill.datasets import load_test

    test = load_test("svamp")
    golds = Counter(test.column("answer").to_pylist())
    (top, count), (_, second) = golds.most_common(2)
    assert test.num_rows == 300 and (top, count) == ("1", 25) and second < count
    assert round(100 * count / test.num_rows, 2) == 8.33


def test_report_baseline_rows_and_tests_on_the_svamp_test_set(tmp_path):
    """A report on the real SVAMP questions: the constant-answer row reads 8.3 (25/300), chance is left
    out (free-form numbers), and each cell's test against the constant answer counts its discordant
    questions against the questions whose gold is "1"."""
    from raydistill.datasets import load_test

    test = load_test("svamp")
    ids, golds = test.column("question_id").to_pylist(), test.column("answer").to_pylist()
    is_one = np.array([g == "1" for g in golds])
    weak, strong = is_one.copy(), draws(0.35, 300, 7)
    weak[:40] = draws(0.1, 40, 8)  # about as good as always answering "1"
    write_trial(tmp_path, weak, level="1", ids=ids, gold=golds)
    write_trial(tmp_path, strong, level="2", ids=ids, gold=golds)
    paths = run_report(tmp_path)

    (constant, chance) = read_csv(paths["baselines_csv"])
    assert constant["answer"] == "1" and float(constant["accuracy"]) == pytest.approx(25 / 300)
    assert (constant["n_correct"], constant["n_questions"]) == ("25", "300")
    assert chance["baseline"] == "chance" and chance["accuracy"] == ""
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if "**baseline**: constant answer" in line)
    assert row.startswith("| svamp |") and row.count("_8.3 (25/300)_") == 2  # under L1 and L2
    assert "**baseline**: chance" not in md and "undefined for free-form answers (svamp)" in md

    tests = {t["level_b"]: t for t in read_csv(paths["paired_csv"]) if t["family"] == "baseline"}
    assert set(tests) == {"1", "2"}
    for level, correct in (("1", weak), ("2", strong)):
        t = tests[level]
        n11, n10, n01, n00 = _counts(is_one, correct)
        assert (int(t["n_b_better"]), int(t["n_a_better"])) == (n10, n01)
        assert float(t["p_value"]) == stats.sign_test(correct.astype(float) - is_one).p_value
        assert float(t["diff"]) == pytest.approx(correct.mean() - 25 / 300)
        assert (float(t["diff_ci_low"]), float(t["diff_ci_high"])) == pytest.approx(
            stats.newcombe_paired_interval(n11, n10, n01, n00))
        assert t["teacher"] == 'constant "1"' and t["teacher_b"] == "chatgpt"
    assert float(tests["2"]["p_holm"]) <= 0.05 < float(tests["1"]["p_holm"])
    flags = {c["level"]: c["flags"] for c in read_csv(paths["csv"])}
    assert flags["2"] == ""
    n11, n10, n01, n00 = _counts(is_one, weak)
    expected = (f'not significantly above the constant answer "1": {100 * weak.mean():.1f} % vs 8.3 % on 300 '
                f"questions, {n10} better / {n01} worse, p = ")
    assert flags["1"].startswith(expected)
    assert f"- svamp/chatgpt/cot/tiny-llama L1: {expected}" in md


def test_chance_per_task_and_the_most_frequent_label(tmp_path):
    """Multiple choice: 1 / the registry's option count (OBQA 4, CSQA 5, AQuA 5); True/False: 1/2 (also
    for a task outside the registry); free-form numbers: undefined. The constant answer is the most
    frequent label, ties to the first in sorted order."""
    assert report.chance_level("obqa", ["A"]) == (0.25, "4 options")
    assert report.chance_level("csqa", ["A"]) == (0.2, "5 options")
    assert report.chance_level("aqua", ["A"]) == (0.2, "5 options")
    assert report.chance_level("strategyqa", ["True"]) == (0.5, "True/False")
    assert report.chance_level("my_task", ["True", "False"]) == (0.5, "True/False")
    assert report.chance_level("gsm8k", ["True", "False"])[0] is None
    assert report.chance_level("my_task", ["3", "4"])[0] is None

    labels = ["B", "C", "C", "A", "B", "D", "A", "B", "C", "D"] * 6  # B and C tie at 18: B wins
    write_trial(tmp_path, draws(0.6, 60, 1), dataset="obqa", level="1", gold=labels)
    paths = run_report(tmp_path)
    constant, chance = read_csv(paths["baselines_csv"])
    assert constant["answer"] == "B" and float(constant["accuracy"]) == pytest.approx(18 / 60)
    assert float(chance["accuracy"]) == 0.25 and chance["basis"] == "4 options"
    md = paths["markdown"].read_text()
    assert '| obqa | **baseline**: constant answer "B" | — | (not a trial) | _30.0 (18/60)_ |' in md
    assert "| obqa | **baseline**: chance (4 options) | — | (not a trial) | _25.0_ |" in md


def test_every_comparison_has_a_newcombe_interval_and_is_never_read_as_no_difference(tmp_path):
    n = 120
    levels = {"1": draws(0.3, n, 1), "2": draws(0.33, n, 2), "3": draws(0.7, n, 3), "4": draws(0.72, n, 4)}
    for level, correct in levels.items():
        write_trial(tmp_path, correct, level=level)
    write_trial(tmp_path, draws(0.5, n, 5), teacher="human", level="")
    paths = run_report(tmp_path)
    rows = read_csv(paths["paired_csv"])
    assert {t["family"] for t in rows} == {"levels", "all_levels", "sources", "baseline"}
    for t in rows:
        low, high, diff = float(t["diff_ci_low"]), float(t["diff_ci_high"]), float(t["diff"])
        assert low <= diff <= high
        verdict = "significant" if float(t["p_holm"]) <= 0.05 else "not significant"
        assert t["reading"] == f"{verdict}, Δ in [{100 * low:+.1f}, {100 * high:+.1f}]"
    for t in (t for t in rows if t["family"] in ("levels", "all_levels")):
        a, b = levels[t["level_a"]], levels[t["level_b"]]
        assert (float(t["diff_ci_low"]), float(t["diff_ci_high"])) == pytest.approx(
            stats.newcombe_paired_interval(*_counts(a, b)))
    # all pairs of levels: 6 comparisons, Holm over those 6 (not over the 3 neighbouring ones)
    all_pairs = {(t["level_a"], t["level_b"]): t for t in rows if t["family"] == "all_levels"}
    assert set(all_pairs) == {("1", "2"), ("1", "3"), ("1", "4"), ("2", "3"), ("2", "4"), ("3", "4")}
    assert [float(t["p_holm"]) for t in all_pairs.values()] == pytest.approx(
        stats.holm_adjust([float(t["p_value"]) for t in all_pairs.values()]))
    neighbours = {(t["level_a"], t["level_b"]): t for t in rows if t["family"] == "levels"}
    assert set(neighbours) == {("1", "2"), ("2", "3"), ("3", "4")}
    assert float(all_pairs[("1", "2")]["p_holm"]) >= float(neighbours[("1", "2")]["p_holm"])

    md = paths["markdown"].read_text()
    assert "## All pairs of levels: exact paired tests" in md and "L1 → L4" in md
    t12 = neighbours[("1", "2")]
    assert float(t12["p_holm"]) > 0.05  # 30 % vs 33 %: the reading gives the interval, not a verdict of equality
    assert (f"not significant, Δ in [{100 * float(t12['diff_ci_low']):+.1f}, "
            f"{100 * float(t12['diff_ci_high']):+.1f}]") in md
    lowered = md.lower()
    assert "no difference" not in lowered and "equivalent" not in lowered and "as good as" not in lowered


def test_all_pairs_section_is_left_out_when_it_repeats_the_neighbours(tmp_path):
    write_trial(tmp_path, draws(0.3, 100, 1), level="1")
    write_trial(tmp_path, draws(0.6, 100, 2), level="2")
    paths = run_report(tmp_path)
    assert "## All pairs of levels" not in paths["markdown"].read_text()
    assert [t["family"] for t in read_csv(paths["paired_csv"])].count("all_levels") == 1


def test_difference_interval_over_several_seeds_uses_the_summed_products(tmp_path):
    n = 80
    a = [draws(0.3, n, 1), draws(0.35, n, 2)]
    b = [draws(0.5, n, 3), draws(0.45, n, 4)]
    for seed in (0, 1):
        write_trial(tmp_path, a[seed], level="1", seed=str(seed))
        write_trial(tmp_path, b[seed], level="2", seed=str(seed))
    (t,) = [t for t in read_csv(run_report(tmp_path)["paired_csv"]) if t["family"] == "levels"]
    x, y = np.mean(a, axis=0), np.mean(b, axis=0)  # question scores averaged over the paired seeds
    expected = stats.newcombe_paired_interval((y * x).sum(), (y * (1 - x)).sum(), ((1 - y) * x).sum(),
                                              ((1 - y) * (1 - x)).sum())
    assert (float(t["diff_ci_low"]), float(t["diff_ci_high"])) == pytest.approx(expected)
    assert float(t["diff"]) == pytest.approx(y.mean() - x.mean())
    assert float(t["diff_ci_low"]) < float(t["diff"]) < float(t["diff_ci_high"])
