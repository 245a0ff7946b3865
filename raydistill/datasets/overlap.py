"""Train/test contamination: question overlap of each raw training file with the test set."""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.datasets.mirror import get_field, local_path, read_rows
from raydistill.datasets.release import TrainFile, cell_name, train_files
from raydistill.datasets.tables import load_test, question_id, text_key


@dataclass(frozen=True)
class Overlap:
    """Overlap between one raw training file and the test set."""

    path: str
    cells: str
    rows: int
    id_overlap: int  # rows whose question_id is a test question_id
    text_overlap: int  # rows whose text_key is a test text_key


@dataclass(frozen=True)
class ContaminationReport:
    task: str
    test_rows: int
    sources: tuple[Overlap, ...]
    unavailable: tuple[str, ...]  # training files not on this machine (not checked)

    def to_text(self) -> str:
        lines = [f"{self.task}: {self.test_rows} test questions; overlap of each raw "
                 f"training file (load_train drops the question_id overlaps)"]
        lines += [f"  {o.id_overlap:>5} id  {o.text_overlap:>5} text  of {o.rows:>5} rows  "
                  f"{o.path} ({o.cells})" for o in self.sources]
        lines += [f"  not available offline: {p}" for p in self.unavailable]
        return "\n".join(lines)


def contamination(task: str) -> ContaminationReport:
    """Exact question_id and normalised-text overlap of each raw training file with the test."""
    test = load_test(task)
    test_ids = set(test.column("question_id").to_pylist())
    test_keys = {text_key(q) for q in test.column("question").to_pylist()}
    by_path: dict[str, list[TrainFile]] = {}
    for tf in train_files(task):
        by_path.setdefault(tf.path, []).append(tf)
    sources, unavailable = [], []
    for path, tfs in by_path.items():
        if local_path(path) is None:
            unavailable.append(path)
            continue
        questions = [get_field(r, tfs[0].prompt, path, i) for i, r in enumerate(read_rows(path))]
        sources.append(Overlap(
            path, ", ".join(cell_name(tf.cell) for tf in tfs), len(questions),
            sum(question_id(q) in test_ids for q in questions),
            sum(text_key(q) in test_keys for q in questions)))
    return ContaminationReport(task, test.num_rows, tuple(sources), tuple(unavailable))
