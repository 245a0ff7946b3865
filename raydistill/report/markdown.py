"""results.md: one Markdown section per table (accuracy by level, paired tests, weak numbers,
published numbers, cost, where the time went, the paper's ablation) and the text formatting they share."""

from __future__ import annotations

import math

from raydistill import stats
from raydistill.records import CPU_STAGES, TIME_STAGES
from raydistill.report.baselines import Baseline
from raydistill.report.cells import (
    ALL_LEVELS_FAMILY,
    BASELINE_FAMILY,
    FORMATS_FAMILY,
    LEVELS_FAMILY,
    SOURCES_FAMILY,
    TEACHERS_FAMILY,
    TRUNCATION_FLAG,
    Cell,
    Comparison,
    Cost,
    accuracy_per_usd,
    by_row,
    level_label,
    sorted_levels,
)
from raydistill.report.intervals import ALPHA
from raydistill.report.records import ROW_AXES

TRUNCATED_MARK = "†"


def pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def cell_text(cell: Cell) -> str:
    """'52.1 [48.0, 56.2] ×3' (+ ' †' when truncated, ' · paper 53.42'): mean over seeds, 95 %
    interval, seed count."""
    text = f"{100 * cell.accuracy:.1f}"
    if cell.interval:
        text += f" [{pct(cell.interval.low)}, {pct(cell.interval.high)}]"
    text += f" ×{len(cell.trials)}"
    if cell.truncated:
        text += f" {TRUNCATED_MARK}"
    if cell.published:
        text += f" · paper {cell.published['accuracy_pct']:.2f}"
    return text


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def baseline_rows(baselines: dict[str, Baseline], n_levels: int) -> list[list[str]]:
    """Rows of the accuracy table for the baselines (marked as such; the same value under every level)."""
    rows = []
    for b in baselines.values():
        constant = f"_{100 * b.accuracy:.1f} ({b.n_correct}/{b.n_questions})_"
        rows.append([b.dataset, f"**baseline**: constant answer \"{b.answer}\"", "—", "(not a trial)",
                     *[constant] * n_levels])
        if b.chance is not None:
            rows.append([b.dataset, f"**baseline**: chance ({b.chance_basis})", "—", "(not a trial)",
                         *[f"_{100 * b.chance:.1f}_"] * n_levels])
    return rows


def accuracy_section(cells: list[Cell], n_boot: int, baselines: dict[str, Baseline] | None = None) -> list[str]:
    levels = sorted_levels(cells)
    headers = [*ROW_AXES, *(level_label(lvl) for lvl in levels)]
    rows = [[*row, *(cell_text(by[lvl]) if lvl in by else "" for lvl in levels)]
            for row, by in by_row(cells).items()]
    baselines = baselines or {}
    rows += baseline_rows(baselines, len(levels))
    n_test = sorted({int(t.metrics.get("n_test", 0)) for c in cells for t in c.trials})
    methods = sorted({c.interval.method for c in cells if c.interval})
    truncated = [c for c in cells if c.truncated]
    lines = ["## Accuracy by granularity level", "", *_md_table(headers, rows), "",
             f"Accuracy (%) on {', '.join(map(str, n_test))} test questions: mean over seeds, "
             f"[95 % interval: {_methods_text(methods, n_boot)}], ×seeds; "
             "'paper' is the published accuracy for the same dataset, teacher, student and level."]
    if baselines:
        undefined = [b.dataset for b in baselines.values() if b.chance is None]
        lines.append("**baseline** rows are not trials: the constant answer is the accuracy (correct/questions) of "
                     "always giving the most frequent gold answer of the test questions evaluated; chance is "
                     "1/number of options (multiple choice) or 1/2 (True/False)"
                     + (f", undefined for free-form answers ({', '.join(undefined)})" if undefined else "")
                     + ". Each cell is tested against the constant answer below.")
    if truncated:
        lines.append(f"{TRUNCATED_MARK} more than {100 * TRUNCATION_FLAG:.0f} % of the cell's generations hit "
                     f"max_new_tokens, so its accuracy is bounded by the cut, not only by the student "
                     f"({len(truncated)} of {len(cells)} cells; see 'Weak numbers').")
    return lines + [""]


def _methods_text(methods: list[str], n_boot: int) -> str:
    words = {"wilson": "Wilson score interval (one seed)",
             "bootstrap": f"percentile bootstrap over questions, {n_boot} resamples (one seed, several samples)",
             "bootstrap-seeds": f"two-stage percentile bootstrap, seeds then questions, {n_boot} resamples "
                                "(several seeds: training variance and the question sample)",
             "bootstrap+wilson": "Wilson over the questions where the bootstrap had zero width",
             "bootstrap-seeds+wilson": "Wilson over the questions where the bootstrap had zero width"}
    return "; ".join(words[m] for m in methods) or "none (no predictions)"


def paired_section(comparisons: list[Comparison]) -> list[str]:
    lines = ["## Neighbouring levels and the length ablation: exact paired tests", ""]
    if not comparisons:
        return lines + ["No table row has two numbered levels with predictions to pair.", ""]
    headers = [*ROW_AXES, "comparison", *_TEST_HEADERS]
    rows = [[*c.row, c.label, *_test_cells(c)] for c in comparisons]
    return lines + _md_table(headers, rows) + [
        "", "Δ = accuracy of the right-hand cell (the higher level, or the padded cell of the length "
        "ablation) minus the left one on the questions both answered. " + _test_note(len(comparisons)), ""]


def source_section(comparisons: list[Comparison]) -> list[str]:
    """Sources without levels (human, answer-only) against the levels: a Holm family of its own."""
    if not comparisons:
        return []
    headers = ["dataset", "format", "student", "comparison", *_TEST_HEADERS]
    rows = [[c.row[0], *c.row[2:4], c.label, *_test_cells(c)] for c in comparisons]
    return ["## Sources without levels against the levels: exact paired tests", "", *_md_table(headers, rows),
            "", "Δ = accuracy of the right-hand source (human rationales, bare answers) minus the left-hand "
            "cell on the questions both answered. " + _test_note(len(comparisons)), ""]


def across_section(comparisons: list[Comparison], family: str) -> list[str]:
    """Teachers at one level, or formats at one level: each a Holm family of its own."""
    if not comparisons:
        return []
    what = {TEACHERS_FAMILY: ("Teachers at the same level", "teacher"),
            FORMATS_FAMILY: ("Formats at the same level", "format (CoT on the left where present)")}[family]
    headers = [*ROW_AXES, "comparison", *_TEST_HEADERS]
    rows = [[*c.row, c.label, *_test_cells(c)] for c in comparisons]
    return [f"## {what[0]}: exact paired tests", "", *_md_table(headers, rows), "",
            f"Δ = accuracy of the right-hand {what[1]} minus the left-hand one, same dataset, student and "
            "level, on the questions both answered; the row names the left-hand cell. "
            + _test_note(len(comparisons)), ""]


_TEST_HEADERS = ["Δ accuracy (pp)", "Δ 95 % CI (pp)", "better / worse", "p", "p (Holm)", "reading",
                 "smallest detectable Δ (pp)", "questions", "paired on"]


def _test_cells(c: Comparison) -> list:
    return [f"{100 * c.test.diff:+.1f}", _diff_interval_text(c), f"{c.test.n_b_better} / {c.test.n_a_better}",
            _p_text(c.test.p_value), _p_text(c.test.p_holm), reading(c), _detectable_text(c.test.min_detectable),
            c.test.n_questions, c.paired_on]


def _diff_interval_text(c: Comparison) -> str:
    if c.test.ci_low is None or c.test.ci_high is None:
        return ""
    return f"[{100 * c.test.ci_low:+.1f}, {100 * c.test.ci_high:+.1f}]"


def reading(c: Comparison) -> str:
    """How a comparison reads: 'significant, Δ in [a, b]' (Holm-adjusted p ≤ ALPHA) or 'not significant,
    Δ in [a, b]'; never 'no difference': a non-significant test does not show the cells equal."""
    p = c.test.p_holm if c.test.p_holm is not None else c.test.p_value
    verdict = "significant" if p <= ALPHA else "not significant"
    interval = _diff_interval_text(c)
    return f"{verdict}, Δ in {interval}" if interval else verdict


def _test_note(n_comparisons: int) -> str:
    return ("'better / worse' counts the questions the right-hand cell scores above / below the left one "
            "(the discordant questions); p is the exact two-sided sign test on them (the exact McNemar test "
            f"for one seed), Holm-adjusted over the {n_comparisons} comparisons of this table. With n "
            f"questions a difference below {stats.min_discordant_for_significance(ALPHA)}/n cannot reach "
            f"p ≤ {ALPHA}: the 'smallest detectable Δ' column. 'Δ 95 % CI' is Newcombe's hybrid score interval "
            "for a difference of paired proportions (method 10, 1998); 'reading' says whether the Holm-adjusted "
            f"p is ≤ {ALPHA} and repeats the interval: a test that is not significant leaves every Δ in the "
            "interval possible, it does not show the two cells equal.")


def _detectable_text(value: float) -> str:
    return "none possible" if math.isinf(value) else f"{100 * value:.1f}"


def all_levels_section(comparisons: list[Comparison], neighbours: list[Comparison]) -> list[str]:
    """Every pair of numbered levels of a row (its own Holm family); omitted when it holds only the
    neighbouring pairs already shown."""
    pairs = {(c.a.key, c.b.key) for c in comparisons}
    if not comparisons or pairs <= {(c.a.key, c.b.key) for c in neighbours}:
        return []
    headers = [*ROW_AXES, "comparison", *_TEST_HEADERS]
    rows = [[*c.row, c.label, *_test_cells(c)] for c in comparisons]
    return ["## All pairs of levels: exact paired tests", "", *_md_table(headers, rows), "",
            "Δ = accuracy of the higher level minus the lower one on the questions both answered. "
            + _test_note(len(comparisons)), ""]


def baseline_section(comparisons: list[Comparison], baselines: dict[str, Baseline]) -> list[str]:
    """Every cell against its dataset's constant answer (exact paired test on the same questions)."""
    if not comparisons:
        return []
    headers = [*ROW_AXES, "level", "constant answer", *_TEST_HEADERS]
    rows = [[*c.b.key[:4], level_label(c.b.level), f"\"{baselines[c.b.key[0]].answer}\"", *_test_cells(c)]
            for c in comparisons]
    flagged = sum(1 for c in comparisons if c.b.baseline_flag)
    return ["## Against the constant answer: exact paired tests", "", *_md_table(headers, rows), "",
            "Δ = accuracy of the cell minus that of always giving the constant answer (the most frequent gold "
            "answer), on the questions the cell answered; the constant answer is right exactly on the questions "
            f"whose gold it is. A cell whose Δ is not positive with Holm-adjusted p ≤ {ALPHA} is "
            f"flagged under 'Weak numbers' ({flagged} of {len(comparisons)} cells). " + _test_note(len(comparisons)),
            ""]


def quality_section(cells: list[Cell]) -> list[str]:
    """Per cell: what can make its number weak, and the cells flagged."""
    thinking = any(c.mean("think_unfinished_rate") is not None for c in cells)
    headers = [*ROW_AXES, "level", "truncated", "empty", "no answer", "target ceiling", "teacher cut",
               "mean tokens", *(["think cut", "think tokens", "answer tokens"] if thinking else []),
               "max new tokens", "interval"]
    rows = [[*c.key[:4], level_label(c.level), _share_text(c.truncation_rate), _share_text(c.empty_rate),
             _share_text(c.mean("extraction_failure_rate")), _share_text(c.mean("target_ceiling")),
             _share_text(c.teacher_truncated_share), _number_text(c.mean("mean_generated_tokens")),
             *([_share_text(c.mean("think_unfinished_rate")), _number_text(c.mean("mean_think_tokens")),
                _number_text(c.mean("mean_answer_tokens"))] if thinking else []),
             _number_text(c.mean("max_new_tokens")), c.interval.method if c.interval else ""] for c in cells]
    flagged = [c for c in cells if c.flags()]
    lines = ["## Weak numbers", "", *_md_table(headers, rows), "",
             "truncated: share of generations that hit max_new_tokens with text in them; empty: share with "
             "only whitespace once special tokens are removed (the student emitted only special tokens, "
             "blank lines or a stop "
             "string; at any length, never counted as truncated; blank for trials evaluated before the two "
             "were told apart); no answer: share with no extractable answer; target ceiling: share of the "
             "cell's training targets graded correct against their own answers (a student that copied its "
             "targets would score this); teacher cut: share of the teacher's replies cut at max_tokens "
             "(generated cells)."
             + (" think cut: share of a thinking student's generations that ended inside the think block "
                "(no answer, never graded from the trace); think / answer tokens: mean lengths of the trace "
                "and of what follows it (blank for students evaluated without eval.think)." if thinking else ""),
             ""]
    if not flagged:
        return lines + ["No cell is flagged.", ""]
    return lines + ["Flagged cells:", ""] + [
        f"- {'/'.join(c.key[:4])} {level_label(c.level)}: {'; '.join(c.flags())}" for c in flagged] + [""]


def seeds_section(cells: list[Cell]) -> list[str]:
    """Per cell trained with several seeds: each seed's accuracy, their range and spread."""
    seeded = [c for c in cells if len(c.trials) > 1]
    if not seeded:
        return []
    headers = [*ROW_AXES, "level", "seeds", "accuracy per seed", "range", "SD", "mean [95 % interval]"]
    rows = [[*c.key[:4], level_label(c.level), " ".join(c.seeds),
             " / ".join(f"{100 * a:.1f}" for a in c.seed_accuracies),
             f"{100 * (max(c.seed_accuracies) - min(c.seed_accuracies)):.1f}", f"{100 * c.seed_sd:.1f}",
             cell_text(c).split(" ×")[0]] for c in seeded]
    return ["## Seeds: how far training variance moves a cell", "", *_md_table(headers, rows), "",
            "Accuracy (%) of each seed's trial on the same test questions; range = max − min, SD with n − 1. "
            "The interval is the two-stage bootstrap (seeds, then questions), so it covers both; with few "
            "seeds the seed stage draws from few values and understates training variance (by about "
            "√((s − 1)/s) for s seeds).", ""]


def samples_section(cells: list[Cell]) -> list[str]:
    """pass@1, pass@k and maj@k of the cells evaluated with several samples per question."""
    sampled = [c for c in cells if c.samples_k]
    if not sampled:
        return []
    headers = [*ROW_AXES, "level", "k", "pass@1", "pass@k", "maj@k"]
    rows = [[*c.key[:4], level_label(c.level), c.samples_k, cell_text(c).split(" ×")[0],
             _interval_text(c.pass_interval), _interval_text(c.maj_interval)] for c in sampled]
    return ["## Several samples per question: pass@k and maj@k", "", *_md_table(headers, rows), "",
            "k samples per question; pass@1 is the accuracy over all samples (the table above), pass@k the "
            "unbiased estimator 1 − C(n−c, k)/C(n, k) per question, maj@k scores a question right when "
            "the most common extracted answer of its first k samples is right (ties: the answer seen "
            "first). Each with its 95 % interval over the questions; see docs/report.md.", ""]


def _interval_text(interval) -> str:
    return "" if interval is None else f"{100 * interval.estimate:.1f} [{pct(interval.low)}, {pct(interval.high)}]"


def _share_text(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _number_text(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _p_text(p: float | None) -> str:
    if p is None:
        return ""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def published_section(cells: list[Cell], published: list[dict]) -> list[str]:
    lines = ["## Published numbers side by side", ""]
    matched = [c for c in cells if c.published]
    if not matched:
        held = sorted({(r["dataset"], r["teacher"]) for r in published if r.get("teacher")})
        what = "; ".join(f"{d}/{t}" for d, t in held) or "none held"
        return lines + [f"No cell matches a published number (the paper's numbers cover {what}, "
                        f"students {', '.join(sorted({r['student'] for r in published if r.get('student')}))}).", ""]
    headers = ["dataset", "teacher", "format", "student", "level", "ours (%)", "95 % CI", "paper (%)",
               "paper row", "ours − paper (pp)"]
    rows = []
    for c in matched:
        ci = f"[{pct(c.interval.low)}, {pct(c.interval.high)}]" if c.interval else ""
        paper = c.published["accuracy_pct"]
        rows.append([*c.key[:4], level_label(c.level), f"{100 * c.accuracy:.1f}", ci, f"{paper:.2f}",
                     c.published["kind"], f"{100 * c.accuracy - paper:+.1f}"])
    return lines + _md_table(headers, rows) + [""]


def cost_section(cells: list[Cell]) -> list[str]:
    headers = [*ROW_AXES, "level", "teacher cost", "teacher tokens in/out", "train s (× workers)",
               "eval s (× actors)", "accuracy % per $"]
    rows = [[*c.key[:4], level_label(c.level), _usd_text(c.cost), _tokens_text(c.cost),
             _seconds_text(c.cost.train_seconds, c.cost.train_worker_seconds),
             _seconds_text(c.cost.eval_seconds, c.cost.eval_actor_seconds),
             "" if accuracy_per_usd(c) is None else f"{accuracy_per_usd(c):.1f}"] for c in cells]
    return ["## Cost per cell", "", *_md_table(headers, rows), "",
            "Teacher cost is the annotation cell's summary (shared by every student trained on it); "
            "'replayed' = released annotations, cost unknown. Compute seconds are summed over seeds; "
            "the parenthesised figure multiplies by Ray Train workers / eval actors.", ""]


def _usd_text(cost: Cost) -> str:
    return f"${cost.usd:.2f}" if cost.source == "generated" else cost.source


def _tokens_text(cost: Cost) -> str:
    return f"{cost.tokens_in:,} / {cost.tokens_out:,}" if cost.source == "generated" else ""


def _seconds_text(seconds: float | None, scaled: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.1f}" + (f" ({scaled:.1f})" if scaled is not None and scaled != seconds else "")


def ablation_section(published: list[dict]) -> list[str]:
    rows = [[r["dataset"], level_label(r.get("level", "")), r.get("variant", ""), f"{r['accuracy_pct']:.2f}",
             r.get("mean_seq_len", "")] for r in published if r.get("kind") == "ablation"]
    if not rows:
        return []
    headers = ["dataset", "level", "variant", "paper accuracy (%)", "mean sequence length"]
    return ["## Paper: granularity vs length ablation (for reference)", "", *_md_table(headers, rows), ""]


def time_section(cells: list[Cell]) -> list[str]:
    """Where the trials' time went, stage by stage, and the useful share (optimizer steps and
    generation) of the trials' own time; trials recorded without a breakdown are counted apart."""
    trials = [t for c in cells for t in c.trials]
    timed = [t.record.timings for t in trials if t.record is not None and t.record.timings.get("wall")]
    if not timed:
        return []
    wall = sum(t["wall"] for t in timed)
    rows = []
    for stage, meaning in TIME_STAGES.items():
        values = [t[stage] for t in timed if stage in t]
        if stage in ("wall", "useful", *CPU_STAGES) or not values:
            continue
        share = "" if stage == "queued" else f"{100 * sum(values) / wall:.1f} %"
        rows.append([stage, f"{sum(values):.1f}", f"{sum(values) / len(values):.1f}", share, meaning])
    useful = [t for t in timed if "useful" in t]
    lines = ["## Where the time went", "", *_md_table(["stage", "seconds (all trials)", "mean per trial",
                                                       "share of trial time", "what"], rows), ""]
    lines.append(f"Trial time (from each trial's start to its record, summed): {wall:.1f} s over {len(timed)} trials. "
                 "Stages measured by evaluation actors (model_load_eval, generation) are actor-seconds, inside "
                 "the evaluation stages; queued is before the trial's start.")
    if useful:
        work = sum(t["useful"] for t in useful)
        span = sum(t["wall"] for t in useful)
        lines.append(f"Useful share (optimizer steps + generation, of trial time): {100 * work / span:.1f} % "
                     f"({work:.1f} of {span:.1f} s, {len(useful)} trials).")
    with_cpu = [t for t in timed if "useful_cpu" in t]
    if with_cpu:
        optimizer, generation = (sum(t.get(stage, 0.0) for t in with_cpu) for stage in ("optimizer_cpu", "generation_cpu"))
        lines.append(f"Useful CPU time: {optimizer + generation:.1f} CPU-seconds ({optimizer:.1f} in optimizer steps, "
                     f"{generation:.1f} generating; {len(with_cpu)} of {len(timed)} timed trials). Trials that share cores "
                     "stretch each other's stages, the useful ones included, so set this against the sweep's wall time x its "
                     "CPUs for the share of the machine that did useful work.")
    if len(timed) < len(trials):
        lines.append(f"{len(trials) - len(timed)} of {len(trials)} trials were recorded without a time breakdown.")
    return [*lines, ""]


def markdown_report(cells: list[Cell], comparisons: list[Comparison], published: list[dict],
                    n_boot: int, seed: int, notes: list[str], baselines: dict[str, Baseline] | None = None) -> str:
    lines = ["# Results", ""]
    lines += accuracy_section(cells, n_boot, baselines)
    neighbours = [c for c in comparisons if c.family == LEVELS_FAMILY]
    lines += paired_section(neighbours)
    lines += all_levels_section([c for c in comparisons if c.family == ALL_LEVELS_FAMILY], neighbours)
    lines += source_section([c for c in comparisons if c.family == SOURCES_FAMILY])
    lines += across_section([c for c in comparisons if c.family == TEACHERS_FAMILY], TEACHERS_FAMILY)
    lines += across_section([c for c in comparisons if c.family == FORMATS_FAMILY], FORMATS_FAMILY)
    lines += baseline_section([c for c in comparisons if c.family == BASELINE_FAMILY], baselines or {})
    lines += seeds_section(cells)
    lines += samples_section(cells)
    lines += quality_section(cells)
    lines += published_section(cells, published)
    lines += cost_section(cells)
    lines += time_section(cells)
    lines += ablation_section(published)
    lines += [f"Bootstrap (where used): {n_boot} resamples, seed {seed}; see docs/report.md.", *notes]
    return "\n".join(lines).rstrip() + "\n"
