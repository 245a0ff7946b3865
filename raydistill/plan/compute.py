"""Training and evaluation before the run: tokens per trial, generated tokens per evaluation,
time from a throughput table, and the memory fit check where GPU memory is declared.

Training tokens: each trial's training rows (a released cell's rows as the sweep replays them,
`raydistill.sweep.cells.released_table`; a finished generated cell's examples.parquet; a cell
still to generate: the release's rationales of the same dataset, level and format as a stand-in,
marked "estimated"), tokenized as training tokenizes them (`raydistill.train.data.
tokenize_examples`: the student's tokenizer and template, cut at cutoff_len), x epochs. Up to
SAMPLE_ROWS rows per (student, cell) are tokenized, evenly spaced, and scaled to the cell's row
count. A student whose weights are not on this machine (a hub student never fetched) is counted
with litellm's default tokenizer (tiktoken cl100k_base) on question + rationale, marked
"stand-in": nothing is downloaded.

Evaluation: the protocol's limit (questions x max_new_tokens x n_samples) and the expected
generated tokens (questions x n_samples x the mean tokens of the training targets' responses: a
student writes about as long as what it learned from), at most the limit.

Time: tokens / (tokens per second per worker x workers) from the throughput table
(raydistill/data/throughput.yaml and ``--throughput FILE``); each row says whether it was measured
or declared. GPU-hours: time x GPUs per trial.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raydistill.resources import package_data

SAMPLE_ROWS = 256
THROUGHPUT_FILE = package_data("throughput.yaml")


class PlanInputError(ValueError):
    """A plan input (throughput file, option) that cannot be used; the message says what to fix."""


def load_throughput(extra: str | None = None) -> dict[tuple[str, str], dict]:
    rows = {}
    for path in [THROUGHPUT_FILE] + ([Path(extra)] if extra else []):
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise PlanInputError(f"{path}: cannot read the throughput table ({' '.join(str(err).split())[:160]}); "
                                 "give a YAML file with rows: [{student, device, train_tokens_per_s, "
                                 "generate_tokens_per_s, kind, source}]") from None
        for i, row in enumerate(data.get("rows") or []):
            missing = [k for k in ("student", "device") if not row.get(k)]
            if missing:
                raise PlanInputError(f"{path}: rows[{i}] lacks {missing}; every row names its student and device")
            for k in ("train_tokens_per_s", "generate_tokens_per_s"):
                if row.get(k) is not None and not (isinstance(row[k], (int, float)) and row[k] > 0):
                    raise PlanInputError(f"{path}: rows[{i}].{k} is {row[k]!r}; give tokens per second, a positive number")
            rows[(row["student"], row["device"])] = {"kind": row.get("kind", "declared"), **row}
    return rows


@dataclass
class Tokenizer:
    student: str
    kind: str  # "student" | "stand-in"
    tokenizer: object | None = None
    template: object | None = None
    note: str = ""

    def lengths(self, rows: list[dict], cutoff: int, overlong: str) -> tuple[list[int], list[int]]:
        """(sequence lengths, response lengths) of the rows as training sees them."""
        if self.kind == "student":
            from raydistill.train.data import IGNORE_INDEX, tokenize_examples

            examples, _ = tokenize_examples(rows, self.tokenizer, self.template, cutoff, overlong)
            return ([len(e["input_ids"]) for e in examples],
                    [sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples])
        from raydistill.plan.teacher import count_text_tokens

        seq, resp = [], []
        for r in rows:
            q, a = count_text_tokens("", r["question"]), count_text_tokens("", r["rationale"])
            if q + a > cutoff and overlong == "drop":
                continue
            seq.append(min(q + a, cutoff))
            resp.append(max(0, min(q + a, cutoff) - q))
        return seq, resp


def local_student_folder(name: str) -> Path | None:
    """The student's HF folder when it is on this machine already (nothing is fetched or built)."""
    from raydistill.students import get_student
    from raydistill.students.weights import HUB_FOLDER, _is_complete, default_cache_dir

    student = get_student(name)
    if student.path is not None:
        return student.path
    root = default_cache_dir()
    if student.build is not None:
        folder = root / f"{student.name}-r{student.revision}"
        return folder if _is_complete(folder) else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(student.source, cache_dir=root / HUB_FOLDER, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        return None


def student_tokenizer(name: str) -> Tokenizer:
    from raydistill.students import get_student, get_template

    folder = local_student_folder(name)
    if folder is None:
        return Tokenizer(name, "stand-in", note=f"{name}'s weights are not on this machine: tokens counted with "
                         "tiktoken cl100k_base (question + rationale, no template)")
    from raydistill.evaluate.hf_engine import load_tokenizer

    student = get_student(name)
    return Tokenizer(name, "student", load_tokenizer(str(folder), student.template), get_template(student.template))


def cell_rows(planned) -> tuple[list[dict], str]:
    """The training rows of a planned cell and where they come from."""
    import pyarrow.parquet as pq

    from raydistill.sweep.cells import released_table

    if planned.status == "replay":
        table, basis = released_table(planned.identified), "released"
    elif planned.status == "cached":
        table, basis = pq.read_table(Path(planned.folder) / "examples.parquet"), "generated"
    else:  # still to generate: the release's rationales of the same cell as a stand-in
        cell = planned.identified
        from raydistill.datasets import CellNotReleased, DataUnavailable, load_train

        table = None
        for teacher in ("chatgpt", "gemini", "llama"):
            try:
                table = load_train(cell.dataset, teacher, level=cell.level, fmt=cell.format)
                break
            except (CellNotReleased, DataUnavailable, ValueError):  # ValueError: a format the release has not
                continue
        if table is None:
            return [], "no stand-in"
        rows = planned.annotation.questions.limit or table.num_rows
        table = table.slice(0, rows)
        basis = f"estimated ({teacher}'s released rationales)"
        if planned.annotation.samples > 1:  # keep_all keeps every sample: k rows a question at most
            basis += f"; up to {planned.annotation.samples} samples a question"
    return table.select(["question", "rationale"]).to_pylist(), basis


@dataclass
class CellTokens:
    rows: int
    tokens: float  # one epoch
    mean_response: float
    basis: str


@dataclass
class ComputePlan:
    trials: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)
    throughput: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)


def plan_compute(grid, spec, device: str | None = None, throughput_file: str | None = None) -> ComputePlan:
    table = load_throughput(throughput_file)
    device = device or ("h100" if spec.train.use_gpu else "cpu-core")
    cells = {c.cell: c for c in grid.cells if c.status != "missing"}
    toks: dict[str, Tokenizer] = {}
    sizes: dict[tuple, CellTokens] = {}
    out = ComputePlan()
    used_rows = {}
    totals = dict(train_tokens=0.0, generate_limit=0, generate_expected=0.0, train_s=0.0, eval_s=0.0,
                  gpu_hours=0.0, timed_trials=0)
    for trial in grid.trials:
        planned = cells[trial.cell]
        if trial.student not in toks:
            toks[trial.student] = student_tokenizer(trial.student)
        tok = toks[trial.student]
        who = trial.student if tok.kind == "student" else "stand-in"  # one stand-in count serves every student
        key = (who, planned.cell.cell_hash, trial.train.cutoff_len, trial.train.overlong)
        if key not in sizes:
            rows, basis = cell_rows(planned)
            step = max(1, math.ceil(len(rows) / SAMPLE_ROWS))
            sample = rows[::step]
            seq, resp = tok.lengths(sample, trial.train.cutoff_len, trial.train.overlong) if sample else ([], [])
            scale = len(rows) / len(sample) if sample else 0
            sizes[key] = CellTokens(len(rows), sum(seq) * scale, statistics.fmean(resp) if resp else 0.0, basis)
        ct = sizes[key]
        n = grid.test_questions.get(trial.cell.dataset, 0)
        ev = trial.eval
        limit = n * ev.max_new_tokens * ev.n_samples
        expected = min(limit, n * ev.n_samples * ct.mean_response)
        train_tokens = ct.tokens * trial.train.epochs
        row = table.get((trial.student, device))
        used_rows[(trial.student, device)] = row
        entry = {"trial": "/".join(trial.axes().values()), "student": trial.student, "rows": ct.rows,
                 "rows_basis": ct.basis, "train_tokens": round(train_tokens), "epochs": trial.train.epochs,
                 "tokenizer": tok.kind, "test_questions": n, "max_new_tokens": ev.max_new_tokens,
                 "num_beams": ev.num_beams, "generate_limit": limit, "generate_expected": round(expected)}
        if row and row.get("train_tokens_per_s") and row.get("generate_tokens_per_s"):
            workers, actors = trial.train.num_workers, ev.num_actors
            train_s = train_tokens / (row["train_tokens_per_s"] * workers)
            eval_s = expected / (row["generate_tokens_per_s"] * actors)
            entry.update(train_s=round(train_s), eval_s=round(eval_s), throughput=row["kind"],
                         gpu_hours=round((train_s * (workers * trial.train.gpus_per_worker if trial.train.use_gpu else 0)
                                          + eval_s * (actors if ev.use_gpu else 0)) / 3600, 3))
            totals["train_s"] += train_s
            totals["eval_s"] += eval_s
            totals["gpu_hours"] += entry["gpu_hours"]
            totals["timed_trials"] += 1
        out.trials.append(entry)
        totals["train_tokens"] += train_tokens
        totals["generate_limit"] += limit
        totals["generate_expected"] += expected
    totals.update(trials=len(grid.trials), device=device,
                  wall_s_lower_bound=(totals["train_s"] + totals["eval_s"]) / max(1, spec.max_concurrent_trials))
    out.totals = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items()}
    out.tokenizers = {s: {"kind": t.kind, "note": t.note} for s, t in toks.items()}
    out.throughput = [{"student": s, "device": d, **(r or {"kind": "none", "note": "no row: time not planned"})}
                      for (s, d), r in used_rows.items()]
    out.memory = plan_memory(grid, spec)
    return out


def plan_memory(grid, spec) -> dict:
    """The sweep's own fit check (`raydistill.sweep.fit.check_fit`) where a trial declares GPU
    memory, on the cells and test sets as the sweep reads them; nothing when none does."""
    trials = [t for t in grid.trials if t.train.gpu_memory_gb or t.eval.gpu_memory_gb]
    if not trials:
        return {"checked": False, "note": "no trial declares train.gpu_memory_gb or eval.gpu_memory_gb"}
    from raydistill.sweep.cells import prepare_test, replay_cell
    from raydistill.sweep.console import trial_label
    from raydistill.sweep.fit import Sizes, check_fit
    from raydistill.spec import SpecError

    paths = {}
    for s in {t.student for t in trials}:
        folder = local_student_folder(s)
        if folder is None:
            return {"checked": False, "note": f"{s}'s weights are not on this machine; the sweep checks the fit "
                                              "at its start, after fetching them"}
        paths[s] = str(folder)
    cells = {}
    for c in grid.cells:
        if c.status == "replay":
            cells[c.cell] = replay_cell(c.identified, c.folder)
        elif c.status == "cached":
            cells[c.cell] = {"train_path": str(Path(c.folder) / "examples.parquet")}
    trials = [t for t in trials if t.cell in cells]
    tests = {task: prepare_test(task, spec.test_limit, spec.run_dir) for task in {t.cell.dataset for t in trials}}
    try:
        _, records = check_fit(trials, [trial_label(t) for t in trials], Sizes(paths, cells, tests))
    except SpecError as err:
        return {"checked": True, "fits": False, "error": str(err)}
    return {"checked": True, "fits": True, "trials": len(trials),
            "records": [{"trial": trial_label(t), **(r or {})} for t, r in zip(trials, records)]}
