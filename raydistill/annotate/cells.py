"""One annotation cell on the driver: the requests it plans, its rows (one per question and
sample) written as results arrive, examples.parquet chosen by the policy (`selection`),
summary.json; the result records (`AnnotationResult`, `AnnotationRun`) and the reuse of a
finished cell.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill import files, stats
from raydistill.annotate import selection
from raydistill.datasets.tables import ANSWER_TRIGGER, pad_rationale
from raydistill.schemas import ANNOTATION_SCHEMA, EXAMPLE_SCHEMA
from raydistill.spec.annotation import AnnotationSpec

log = logging.getLogger(__name__)


@dataclass
class AnnotationResult:
    """What one cell produced. Counts are over the cell's rows; ``new_*`` fields count only the
    requests sent during this run (a cache hit costs nothing now)."""

    cell_name: str
    cell_hash: str
    out_dir: str
    annotations_path: str  # ANNOTATION_SCHEMA, one row per question and sample, failures included
    examples_path: str  # EXAMPLE_SCHEMA, the rows the policy keeps (training input)
    summary_path: str
    rows: int = 0  # questions x samples
    succeeded: int = 0
    failed: int = 0
    kept: int = 0
    cache_hits: int = 0
    requests_sent: int = 0  # API calls made now, retries included
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0  # the sum of the rows' cost_usd: the cell's price from an empty cache
    new_cost_usd: float = 0.0  # spent during this run on requests this cell was the first to use
    wall_time_s: float = 0.0
    teacher_accuracy: float | None = None  # correct / succeeded rows that have a gold answer
    mean_rationale_words: float | None = None
    mean_rationale_tokens: float | None = None
    truncated: int = 0  # succeeded rows the teacher cut at max_tokens (finish_reason "length")
    truncated_share: float | None = None  # truncated / succeeded
    errors: dict[str, int] = field(default_factory=dict)  # failure kind -> rows
    levels: dict[str, int] = field(default_factory=dict)  # level -> rows (hybrid cells mix levels)
    reused: bool = False  # outputs existed with the same cell hash; nothing ran
    samples: int = 1  # teacher samples per question
    questions: int = 0
    questions_kept: int = 0  # questions with at least one row in examples.parquet
    policies_would_keep: dict[str, int] = field(default_factory=dict)  # policy -> questions it keeps, same samples
    teacher_pass_at_k: float | None = None  # share of graded questions with a correct sample (k = samples)
    rows_left: int = 0  # rows not sent because the run reached its spending cap (the cell is not complete)
    batch_rows: int = 0  # (mode: batch) requests of this cell answered inside a provider batch during this run
    batch_resent: int = 0  # (mode: batch) of its requests that failed or expired in a batch, how many were sent again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnnotationRun:
    cells: list[AnnotationResult]
    totals: dict[str, Any]  # over unique requests of the run


@dataclass
class PlannedRequest:
    key: str
    teacher_idx: int
    task: str
    gold: str
    messages: list[dict[str, str]]
    prompt_hash: str
    sample: int = 0  # which of the question's samples (its seed and key follow it)


@dataclass
class RequestTarget:
    cell: int
    qidx: int  # index into the cell's question table
    level: int | None  # None: answer-only probe
    role: str  # "main" | "pad_target" | "probe"
    sample: int = 0


class CellState:
    def __init__(self, idx: int, spec: AnnotationSpec, out_dir: Path, questions: pa.Table, teacher_idx: int):
        self.idx = idx
        self.spec = spec
        self.out_dir = out_dir
        self.questions = questions
        self.qids = questions.column("question_id").to_pylist()
        self.qtext = questions.column("question").to_pylist()
        self.gold = questions.column("answer").to_pylist()
        self.qsource = questions.column("source").to_pylist()
        self.teacher_idx = teacher_idx
        self.hash = spec.cell_hash()
        self.name = spec.cell_name()
        self.level_of: list[int] = []  # per question: the level of its main request
        self.probe_rows: list[dict[str, Any] | None] = []
        self.pad_main: dict[tuple[int, int], dict[str, Any]] = {}  # (question, sample) -> its reply
        self.pad_target_words: dict[int, int] = {}
        # per (question, sample): every response its row uses (probe and padding target: sample 0's)
        self.responses_cost: dict[tuple[int, int], dict[str, float]] = {}
        self.writer: pq.ParquetWriter | None = None
        self.tmp_path = out_dir / f".annotations.{uuid.uuid4().hex[:8]}.partial.parquet"
        self.buffer: list[dict[str, Any]] = []
        self.stats = Counter()
        self.sums = Counter()
        self.errors: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.written = 0
        self.left: set[tuple[int, int]] = set()  # (question, sample) not sent: the run reached its spending cap

    # rows --------------------------------------------------------------------------------------
    def make_row(self, qidx: int, level: int | None, req: PlannedRequest, res: dict[str, Any], response: str | None = None,
                 fmt: str | None = None, cost_usd: float | None = None, sample: int = 0) -> dict[str, Any]:
        return {
            "question_id": self.qids[qidx],
            "question": self.qtext[qidx],
            "teacher": self.spec.teacher.label,
            "level": level if level is not None else 0,
            "format": fmt or self.spec.output_format(),
            "prompt_hash": req.prompt_hash,
            "response": res["response"] if response is None else response,
            "extracted": res["extracted"],
            "gold": self.gold[qidx],
            "correct": res["correct"],
            "tokens_in": res["tokens_in"],
            "tokens_out": res["tokens_out"],
            "cost_usd": res["cost_usd"] if cost_usd is None else cost_usd,
            "latency_s": res["latency_s"],
            "error": res["error"],
            "finish_reason": res.get("finish_reason"),
            "sample": sample,
        }

    def account(self, res: dict[str, Any], row: dict[str, Any]) -> None:
        st = self.stats
        st["rows"] += 1
        if row["error"] is None:
            st["succeeded"] += 1
            st["truncated"] += row["finish_reason"] == "length"
            self.sums["words"] += len((row["response"] or "").split())
            self.sums["tokens_out_ok"] += row["tokens_out"]
            if row["correct"] is not None:
                st["graded"] += 1
                st["correct"] += bool(row["correct"])
        else:
            st["failed"] += 1
            self.errors[res.get("error_kind") or "error"] += 1
        if res["cache_hit"]:
            st["cache_hits"] += 1
        else:
            st["requests_sent"] += res["attempts"]
            st["retries"] += max(0, res["attempts"] - 1)
        self.sums["tokens_in"] += row["tokens_in"]
        self.sums["tokens_out"] += row["tokens_out"]
        self.sums["cost"] += row["cost_usd"]
        self.levels[str(row["level"])] += 1

    def emit(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp_path, ANNOTATION_SCHEMA)
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=ANNOTATION_SCHEMA))
        self.written += len(self.buffer)
        self.buffer = []

    def uses(self, qidx: int, req: PlannedRequest, res: dict[str, Any], sample: int = 0) -> None:
        """Record a response that goes into the row of question ``qidx``'s sample (its rationale,
        or for sample 0 the padding target or probe): the row's cost_usd is the price of all of
        them, each counted once."""
        self.responses_cost.setdefault((qidx, sample), {})[req.key] = res["cost_usd"]

    def row_cost(self, qidx: int, sample: int = 0) -> float:
        return sum(self.responses_cost.get((qidx, sample), {}).values())

    def on_result(self, tgt: RequestTarget, req: PlannedRequest, res: dict[str, Any]) -> None:
        if res.get("error_kind") == "spend_cap":  # not sent: the row is left for the next run
            samples = range(self.spec.samples) if tgt.role == "pad_target" else [tgt.sample]
            self.left.update((tgt.qidx, s) for s in samples)
            return
        self.uses(tgt.qidx, req, res, tgt.sample)
        if tgt.role == "main" and self.spec.pad is None:
            row = self.make_row(tgt.qidx, tgt.level, req, res, cost_usd=self.row_cost(tgt.qidx, tgt.sample),
                                sample=tgt.sample)
            self.account(res, row)
            self.emit(row)
        elif tgt.role == "main":
            self.pad_main[(tgt.qidx, tgt.sample)] = {"req": req, "res": res, "level": tgt.level}
        elif tgt.role == "pad_target":
            if res["error"] is None and res["response"]:
                self.pad_target_words[tgt.qidx] = len(res["response"].split())

    def finish_padding(self) -> None:
        assert self.spec.pad is not None
        lens = list(self.pad_target_words.values())
        mean_len = round(sum(lens) / len(lens)) if lens else 0
        for qidx, sample in sorted(self.pad_main):
            if (qidx, sample) in self.left:  # its padding target was not sent
                continue
            m = self.pad_main[(qidx, sample)]
            res = dict(m["res"])
            response = None
            if res["error"] is None and res["response"]:
                target = self.pad_target_words.get(qidx, mean_len)
                response = pad_rationale(res["response"], target, self.spec.pad.filler)
            row = self.make_row(qidx, m["level"], m["req"], res, response=response,
                                cost_usd=self.row_cost(qidx, sample), sample=sample)
            self.account(res, row)
            self.emit(row)

    def close(self, wall: float, order: dict[str, int], stopped: bool = False) -> AnnotationResult:
        """Write the cell. With rows left at the spending cap (or ``stopped`` before its rationales
        were asked for) the answered rows are written and summary.json says ``complete: false``,
        so the next run annotates the cell again (its answered rows from the cache)."""
        if self.spec.pad is not None:
            self.finish_padding()
        self.flush()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.writer is not None:
            self.writer.close()
            table = pq.read_table(self.tmp_path)
        else:
            table = ANNOTATION_SCHEMA.empty_table()
        k = self.spec.samples
        idx = pa.array([order.get(q, 1 << 30) * k + s for q, s in zip(table.column("question_id").to_pylist(),
                                                                       table.column("sample").to_pylist())], pa.int64())
        table = table.take(pc.sort_indices(idx))  # question order, then sample order
        ann = self.out_dir / "annotations.parquet"
        files.write_parquet(table, ann)
        if self.tmp_path.exists():
            self.tmp_path.unlink()
        by_question = samples_by_question(table)
        same = self.same_answer()
        keep = {(qid, s.index) for qid, samples in by_question.items()
                for s in selection.select(samples, self.spec.policy, self.spec.max_per_question, same)}
        kept = table.filter(pa.array([(q, s) in keep for q, s in zip(table.column("question_id").to_pylist(),
                                                                     table.column("sample").to_pylist())],
                                     pa.bool_()))
        source_of = dict(zip(self.qids, self.qsource))
        examples = pa.Table.from_pydict(
            {
                "question_id": kept.column("question_id"),
                "question": kept.column("question"),
                "rationale": [_ensure_trigger(r, x) for r, x in zip(kept.column("response").to_pylist(),
                                                                      kept.column("extracted").to_pylist())],
                "answer": kept.column("gold"),
                "source": [source_of.get(q, "") for q in kept.column("question_id").to_pylist()],
            },
            schema=EXAMPLE_SCHEMA,
        )
        exa = self.out_dir / "examples.parquet"
        files.write_parquet(examples, exa)
        st, sm = self.stats, self.sums
        result = AnnotationResult(
            cell_name=self.name,
            cell_hash=self.hash,
            out_dir=str(self.out_dir),
            annotations_path=str(ann),
            examples_path=str(exa),
            summary_path=str(self.out_dir / "summary.json"),
            rows=table.num_rows,
            succeeded=st["succeeded"],
            failed=st["failed"],
            kept=examples.num_rows,
            cache_hits=st["cache_hits"],
            requests_sent=st["requests_sent"],
            retries=st["retries"],
            tokens_in=int(sm["tokens_in"]),
            tokens_out=int(sm["tokens_out"]),
            cost_usd=float(sm["cost"]),
            new_cost_usd=float(sm["new_cost"]),
            wall_time_s=wall,
            teacher_accuracy=(st["correct"] / st["graded"]) if st["graded"] else None,
            mean_rationale_words=(sm["words"] / st["succeeded"]) if st["succeeded"] else None,
            mean_rationale_tokens=(sm["tokens_out_ok"] / st["succeeded"]) if st["succeeded"] else None,
            truncated=st["truncated"],
            truncated_share=(st["truncated"] / st["succeeded"]) if st["succeeded"] else None,
            errors=dict(self.errors),
            levels=dict(sorted(self.levels.items())),
            samples=k,
            questions=len(by_question),
            questions_kept=len({q for q, _ in keep}),
            policies_would_keep=selection.questions_kept(list(by_question.values()), same),
            teacher_pass_at_k=self.pass_at_k(by_question),
            batch_rows=st["batch_rows"],
            batch_resent=st["batch_resent"],
        )
        if stopped or self.left:
            result.rows_left = len(self.qids) * k - table.num_rows
        summary = {
            "complete": not result.rows_left,
            "cell_name": self.name,
            "cell_hash": self.hash,
            "spec": self.spec.model_dump(mode="json"),
            "identity": self.spec.identity(),
            "result": result.to_dict(),
            "versions": _versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        files.write_json(result.summary_path, summary)
        return result


    def same_answer(self):
        """Whether two extracted answers agree, by the task's grader."""
        from raydistill import answers

        task = self.spec.task
        return lambda a, b: answers.same_answer(task, a, b)

    def pass_at_k(self, by_question: dict[str, list[selection.Sample]]) -> float | None:
        """Teacher pass@k with k = samples (every sample drawn): the share of the questions with a
        gold answer that have at least one correct sample; a failed sample counts as wrong."""
        gold = dict(zip(self.qids, self.gold))
        graded = [samples for q, samples in by_question.items() if gold.get(q)]
        if not graded:
            return None
        return sum(stats.pass_at_k(len(samples), sum(bool(s.ok and s.correct) for s in samples), len(samples))
                   for samples in graded) / len(graded)


def samples_by_question(table: pa.Table) -> dict[str, list[selection.Sample]]:
    """question_id -> its samples in sample order (the table is sorted so), in question order."""
    out: dict[str, list[selection.Sample]] = {}
    cols = [table.column(c).to_pylist() for c in ("question_id", "sample", "error", "correct", "extracted")]
    for qid, sample, error, correct, extracted in zip(*cols):
        out.setdefault(qid, []).append(selection.Sample(sample, error is None, correct, extracted))
    return out


def _ensure_trigger(response: str, extracted: str | None) -> str:
    text = (response or "").strip()
    if extracted is not None and not ANSWER_TRIGGER.search(text):
        text = f"{text} The answer is {extracted}"
    return text


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("raydistill", "litellm", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _read_summary(out_dir: Path) -> dict[str, Any] | None:
    """The cell's summary.json; {} when it exists but is damaged, None when there is none."""
    try:
        data = json.loads((out_dir / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # cut short, not JSON, not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def reuse_finished_cell(spec: AnnotationSpec, out_dir: Path) -> AnnotationResult | None:
    data = _read_summary(out_dir)
    if not data or not data.get("complete") or data.get("cell_hash") != spec.cell_hash():
        return None
    try:
        res = data["result"]
        if not (Path(res["annotations_path"]).exists() and Path(res["examples_path"]).exists()):
            return None
        return AnnotationResult(**{**res, "reused": True})
    except (KeyError, TypeError):  # a summary of another layout: run the cell again
        return None


_CELL_OUTPUTS = ("annotations.parquet", "examples.parquet", "probe.parquet", "summary.json")


def set_aside_other_outputs(spec: AnnotationSpec, out_dir: Path) -> Path | None:
    """Move the outputs of a different cell (or under a damaged summary) out of ``out_dir`` into
    ``out_dir/superseded/<their hash>-<time>/`` before this cell writes there, so nothing computed
    is overwritten. Returns where they went (None: nothing to move)."""
    data = _read_summary(out_dir)
    if data is None or data.get("cell_hash") == spec.cell_hash():
        return None
    old = str(data.get("cell_hash") or "damaged-summary")[:16]
    dest = out_dir / "superseded" / f"{old}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dest.mkdir(parents=True)
    for name in _CELL_OUTPUTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
    what = f"of cell {old}" if data.get("cell_hash") else "under a damaged summary.json"
    log.warning("%s: the outputs %s in this folder were moved to %s; this cell (%s) is written in their place",
                out_dir, what, dest, spec.cell_hash()[:16])
    return dest
