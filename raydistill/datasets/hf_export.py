"""`raydistill data export-hf`: an annotation cell or a trial's predictions as a Hugging Face
``datasets`` folder (``save_to_disk``, loadable offline with ``datasets.load_from_disk``) with a
dataset card, and optionally pushed to the Hub.

The card (``README.md`` in the folder) states only what the folder's own files record: a cell's
``cell.json`` and ``summary.json``, a trial's ``record.json``, the rows themselves, and the
licences pinned for the data mirror's roots (``raydistill/data/upstream.json``). What they do not
record is written as "unknown" (or "replayed" for the paper's released annotations). Endpoints
and keys are never read into the card; a Hub token comes from ``HF_TOKEN`` only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill import files
from raydistill.datasets.mirror import upstream_root
from raydistill.datasets.tables import target_ceiling
from raydistill.spec.base import content_hash

HF_EXTRA = "pip install 'raydistill[hf]'"
TOKEN_ENV = "HF_TOKEN"
CELL_PARQUETS = ("train.parquet", "examples.parquet")  # replayed, generated
TRIAL_PARQUET = "predictions.parquet"
UNKNOWN = "unknown"
REPLAYED = "unknown (replayed: the paper's released annotations)"
WHAT = ("an annotation cell folder (outputs/cells/<hash>/) or a trial folder "
        "(outputs/<sweep>/trials/<hash>/)")


class ExportError(ValueError):
    """Bad input to export-hf; the message is one line naming the path and what to do."""


@dataclass
class Export:
    """One folder's rows and the facts its card states."""

    kind: str  # "cell" or "trial"
    folder: Path
    parquet: Path
    table: pa.Table
    title: str
    sections: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # heading -> (name, value)
    sources: dict[str, str | None] = field(default_factory=dict)  # relative data path -> sha256


# ------------------------------------------------------------------------------ reading


def read_export(path: str | os.PathLike) -> Export:
    """The rows and card facts of a cell or trial folder (or of its Parquet file)."""
    folder = Path(path)
    if folder.is_file() and folder.name in (*CELL_PARQUETS, TRIAL_PARQUET):
        folder = folder.parent
    if not folder.is_dir():
        raise ExportError(f"{path} does not exist or is not a folder; give {WHAT}")
    if (folder / "record.json").exists() or (folder / TRIAL_PARQUET).exists():
        return _trial(folder, _need(folder, TRIAL_PARQUET, "record.json"))
    for name in CELL_PARQUETS:
        if (folder / name).exists():
            return _cell(folder, folder / name)
    if (folder / "cell.json").exists() or (folder / "summary.json").exists():
        raise ExportError(f"{folder} has no train.parquet or examples.parquet: the cell was not finished; "
                          "run its sweep or `raydistill annotate` again to write it")
    raise ExportError(f"{folder} is not a cell or trial folder (no train.parquet, examples.parquet or "
                      f"{TRIAL_PARQUET}); give {WHAT}")


def _need(folder: Path, *names: str) -> Path:
    for name in names:
        if not (folder / name).exists():
            raise ExportError(f"{folder / name} is missing: the trial did not finish; rerun its sweep "
                              "(finished trials are reused) to write it")
    return folder / names[0]


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is damaged ({' '.join(str(exc).split())}); rerun the stage that wrote it") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object; rerun the stage that wrote it")
    return data


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable Parquet file ({' '.join(str(exc).split())}); "
                          "delete it and rerun the stage that wrote it") from None


def _cell(folder: Path, parquet: Path) -> Export:
    table = _read_parquet(parquet)
    spec = _read_json(folder / "cell.json") or {}  # a sweep's cell; `raydistill annotate` writes none
    summary = _read_json(folder / "summary.json") or {}  # a generating teacher's cell
    ident, result = summary.get("identity") or {}, summary.get("result") or {}
    replayed = not summary and spec.get("generator") is None
    task = spec.get("dataset") or ident.get("task")
    teacher = spec.get("teacher") or (ident.get("teacher") or {}).get("label") or UNKNOWN
    level = spec.get("level", ident.get("level"))
    fmt = spec.get("format") or ident.get("format") or UNKNOWN
    title = f"raydistill cell {task or UNKNOWN}/{teacher}/{'-' if level is None else f'L{level}'}/{fmt}"
    ex = Export("cell", folder, parquet, table, title, sources=_sources(spec.get("inputs") or {}, table))
    ex.sections = {
        "Cell": _cell_axes(spec, summary, task, teacher, level, fmt),
        "Teacher and sampling": _teacher(_generator(spec, ident), replayed, teacher),
        "Prompts": _prompts(ident, replayed),
        "Policy": _policy(spec, ident, replayed),
        "Counts": _row_counts(table) + _annotation_counts(result),
        "Quality": [("teacher accuracy", _share(result.get("teacher_accuracy"), replayed)),
                    *([("teacher pass@k", _share(result["teacher_pass_at_k"]))] if "teacher_pass_at_k" in result else []),
                    ("target ceiling", _share(target_ceiling(task, table) if task and table.num_rows else None))],
        "Cost": _cost(result, replayed),
    }
    if summary:
        ex.sections["Versions"] = [*sorted((summary.get("versions") or {}).items()),
                                   ("finished at", summary.get("finished_at", UNKNOWN))]
    return ex


def _cell_axes(spec: dict, summary: dict, task: str | None, teacher: str, level: int | None,
               fmt: str) -> list[tuple[str, Any]]:
    axes = [("cell hash", content_hash(spec))] if spec else []
    axes += [("task", task or UNKNOWN), ("teacher", teacher), ("level", UNKNOWN if level is None else level),
             ("format", fmt)]
    if spec:
        axes += [("train limit", spec.get("train_limit") or "all rows"), ("targets repaired", spec.get("repair_targets")),
                 ("padded to level", spec.get("pad_to_level") or "no")]
    if summary:
        axes += [("annotation hash", summary.get("cell_hash", UNKNOWN)), ("annotation name", summary.get("cell_name")),
                 ("questions", (summary.get("identity") or {}).get("questions", UNKNOWN))]
    return axes


def _policy(spec: dict, ident: dict, replayed: bool) -> list[tuple[str, Any]]:
    """The selection policy, the samples per question it chose from and its cap per question."""
    if replayed:
        return [("policy", "replayed: the released rows")]
    return [("policy", _generator(spec, ident).get("policy", UNKNOWN)),
            ("samples per question", ident.get("samples", 1)),
            ("rows kept per question at most", ident.get("max_per_question") or "no limit")]


def _generator(spec: dict, ident: dict) -> dict:
    """The generating teacher: model, sampling parameters, policy and gold hint, as recorded."""
    gen = {**(spec.get("generator") or {}), **(ident.get("teacher") or {})}
    gen.update({k: ident[k] for k in ("policy", "show_gold") if k in ident})
    return gen


def _trial(folder: Path, parquet: Path) -> Export:
    table = _read_parquet(parquet)
    record = _read_json(folder / "record.json") or {}
    axes, cell = record.get("axes") or {}, record.get("cell") or {}
    spec, metrics, ev = cell.get("spec") or {}, record.get("metrics") or {}, record.get("eval_spec") or {}
    replayed = cell.get("source") != "generated" and spec.get("generator") is None
    task = axes.get("dataset") or spec.get("dataset") or UNKNOWN
    level = f"L{axes['level']}" if axes.get("level") else "-"
    label = f"{task}/{axes.get('teacher', UNKNOWN)}/{level}/{axes.get('format', UNKNOWN)}"
    ex = Export("trial", folder, parquet, table, f"raydistill predictions {axes.get('student', UNKNOWN)} on {label}")
    ex.sections["Trial"] = [("trial hash", record.get("trial_hash", UNKNOWN)), ("eval hash", record.get("eval_hash", UNKNOWN)),
                            ("student", axes.get("student", UNKNOWN)), ("seed", axes.get("seed", UNKNOWN)),
                            ("student weights sha256", (record.get("inputs") or {}).get("student", UNKNOWN)),
                            ("task", task), ("cell", label), ("cell hash", cell.get("hash", UNKNOWN)),
                            ("raydistill version", record.get("raydistill_version") or UNKNOWN)]
    ex.sections["Evaluation"] = [("protocol", record.get("eval_protocol") or UNKNOWN), ("grader", record.get("grader") or UNKNOWN),
                                 ("engine", record.get("engine") or UNKNOWN)] + \
        [(k.replace("_", " "), ev[k]) for k in ("max_new_tokens", "num_beams", "do_sample", "n_samples") if k in ev]
    ex.sections["Teacher and sampling"] = _teacher(spec.get("generator"), replayed, axes.get("teacher", UNKNOWN))
    ex.sections["Prompts"] = _prompts({} if replayed else _cell_identity(cell.get("dir")), replayed)
    ex.sections["Counts"] = _row_counts(table) + _prediction_counts(table)
    ex.sections["Metrics"] = [(k.replace("_", " "), metrics[k]) for k in
                              ("accuracy", "n_test", "extraction_failure_rate", "truncation_rate", "train_examples")
                              if k in metrics]
    annotation = cell.get("annotation") or {}
    ex.sections["Quality"] = [("teacher accuracy on the training cell", _share(annotation.get("teacher_accuracy"), replayed)),
                              ("target ceiling of the training cell", _share(metrics.get("target_ceiling")))]
    ex.sections["Cost"] = _cost(annotation, replayed)
    inputs = {**(spec.get("inputs") or {}), **(record.get("inputs") or {})}
    ex.sources = _sources({k: v for k, v in inputs.items() if k != "student"}, table)
    return ex


def _cell_identity(folder: str | None) -> dict:
    """The annotation identity in a generated cell's summary.json, when that folder is still there."""
    summary = _read_json(Path(folder) / "summary.json") if folder else None
    return (summary or {}).get("identity") or {}


# ------------------------------------------------------------------------------ facts


def _teacher(gen: dict | None, replayed: bool, teacher: str) -> list[tuple[str, Any]]:
    if replayed:
        return [("teacher", f"{teacher} (the paper's released annotations, replayed)"), ("sampling", REPLAYED)]
    if not gen:
        return [("teacher", teacher), ("sampling", UNKNOWN)]
    # model, label and sampling parameters: a request's cache key, which holds no endpoint or key
    shown = {k: v for k, v in gen.items() if k not in ("label", "policy", "show_gold")}
    return [("teacher", teacher), *sorted(shown.items()), ("saw the gold answer", gen.get("show_gold", UNKNOWN))]


def _prompts(ident: dict, replayed: bool) -> list[tuple[str, Any]]:
    if replayed:
        return [("prompt texts' sha256", REPLAYED)]
    out = [("prompt texts' sha256", ", ".join(ident.get("prompts") or [UNKNOWN]))]
    if ident.get("probe_prompt"):
        out.append(("answer-only probe prompt sha256", ident["probe_prompt"]))
    return out


def _row_counts(table: pa.Table) -> list[tuple[str, Any]]:
    questions = len(set(table.column("question_id").to_pylist())) if "question_id" in table.column_names else UNKNOWN
    return [("rows", table.num_rows), ("questions", questions)]


def _annotation_counts(result: dict) -> list[tuple[str, Any]]:
    names = {"rows": "teacher requests (rows of annotations.parquet)", "succeeded": "succeeded", "failed": "failed",
             "kept": "kept by the policy", "truncated": "cut at max_tokens", "errors": "failures by kind",
             "levels": "rows per level", "questions_kept": "questions kept",
             "policies_would_keep": "questions each policy would keep"}
    return [(name, result[k]) for k, name in names.items() if k in result]


def _prediction_counts(table: pa.Table) -> list[tuple[str, Any]]:
    out = []
    for name, col in (("graded correct", "correct"), ("truncated", "truncated")):
        if col in table.column_names:
            out.append((name, int(pc.sum(pc.fill_null(table.column(col), False)).as_py() or 0)))
    return out


def _share(value: float | None, replayed: bool = False) -> str:
    if value is None:
        return REPLAYED if replayed else UNKNOWN
    return f"{100 * value:.1f} %"


def _cost(result: dict, replayed: bool) -> list[tuple[str, Any]]:
    if replayed:
        return [("cost (USD)", REPLAYED)]
    if "cost_usd" not in result:
        return [("cost (USD)", UNKNOWN)]
    return [("cost (USD, every request priced as if the cache were empty)", f"{result['cost_usd']:.4f}"),
            ("tokens in", result.get("tokens_in", UNKNOWN)), ("tokens out", result.get("tokens_out", UNKNOWN))]


def _sources(inputs: dict[str, str], table: pa.Table) -> dict[str, str | None]:
    """Relative data path -> sha256 (None: not recorded): the recorded inputs and the files rows cite."""
    out: dict[str, str | None] = {k: v for k, v in inputs.items() if "/" in k}
    if "source" in table.column_names:
        for src in set(table.column("source").to_pylist()):
            out.setdefault((src or "").split("#")[0], None)
    out.pop("", None)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ the card


def _licence_of(relpath: str) -> tuple[str, str]:
    root = upstream_root(relpath)
    if root is None:
        return UNKNOWN, UNKNOWN
    return root.get("license") or UNKNOWN, f"{root['repo']}@{root['commit'][:12]}"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def card(ex: Export) -> str:
    """README.md of the exported folder: YAML front matter, then the facts section by section."""
    what = ("the training rows of one annotation cell" if ex.kind == "cell"
            else "the predictions of one trial (a student fine-tuned on one cell, graded on the test set)")
    lines = [*_front_matter(ex), "", f"# {ex.title}", "",
             f"{what.capitalize()}, exported by `raydistill data export-hf` from `{ex.parquet.name}` "
             f"({ex.table.num_rows} rows). Every fact below comes from the folder's own files.", ""]
    for heading, facts in ex.sections.items():
        lines += [f"## {heading}", "", *(f"- {name}: {_text(value)}" for name, value in facts), ""]
    lines += [*_sources_table(ex), "", "## Columns", "", *(f"- `{f.name}`: {f.type}" for f in ex.table.schema), "",
              "## Loading", "", "```python", "import datasets", "",
              'rows = datasets.load_from_disk("<this folder>")', "```", ""]
    return "\n".join(lines)


def _front_matter(ex: Export) -> list[str]:
    """The Hub's card metadata, one JSON value (valid YAML) per key."""
    meta = {"license": sorted({_licence_of(p)[0].lower() for p in ex.sources} or {UNKNOWN}),
            "language": ["en"], "pretty_name": ex.title,
            "task_categories": ["text-generation", "question-answering"],
            "tags": ["chain-of-thought", "distillation", "raydistill"],
            "size_categories": [_size_category(ex.table.num_rows)]}
    return ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items()), "---"]


def _sources_table(ex: Export) -> list[str]:
    lines = ["## Source files and licences", "", "| file | sha256 | upstream | licence |", "|---|---|---|---|"]
    for path, digest in ex.sources.items():
        licence, upstream = _licence_of(path)
        lines.append(f"| `{path}` | {digest or 'not recorded'} | {upstream} | {licence} |")
    if not ex.sources:
        lines.append(f"| {UNKNOWN} | | | |")
    return lines


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True) if value else "none"
    return str(value)


# ------------------------------------------------------------------------------ writing


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ExportError(f"export-hf needs the Hugging Face `datasets` package: {HF_EXTRA}") from None
    return datasets


def export_hf(path: str | os.PathLike, out: str | os.PathLike, push_to_hub: str | None = None,
              private: bool = False, overwrite: bool = False) -> Export:
    """Write ``path``'s rows to ``out`` with ``save_to_disk`` and its card as ``out/README.md``;
    with ``push_to_hub`` also push both to that Hub dataset repository (token: ``HF_TOKEN``)."""
    ex = read_export(path)
    out = Path(out)
    token = os.environ.get(TOKEN_ENV) if push_to_hub else None
    if push_to_hub and not token:
        raise ExportError(f"--push-to-hub {push_to_hub} needs a Hub token in the environment variable {TOKEN_ENV}")
    datasets = _datasets()
    _make_room(out, overwrite)
    datasets.disable_progress_bars()
    rows = datasets.Dataset(ex.table, split=datasets.NamedSplit("train"))
    rows.save_to_disk(str(out))
    text = card(ex)
    files.write_text(out / "README.md", text)
    if push_to_hub:
        _push(rows, text, push_to_hub, private, token)
    return ex


def _make_room(out: Path, overwrite: bool) -> None:
    """OUT may be new or empty; --overwrite replaces an earlier export only (never any other folder)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to write")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    if not (out / "state.json").exists():
        raise ExportError(f"{out} is not an earlier export (no state.json), so --overwrite leaves it; "
                          "choose a new folder")
    shutil.rmtree(out)


def _push(rows, text: str, repo: str, private: bool, token: str) -> None:
    """The rows, then the card as the repository's README.md."""
    from huggingface_hub import HfApi

    rows.push_to_hub(repo, private=private, token=token)
    HfApi(token=token).upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo,
                                   repo_type="dataset", commit_message="raydistill dataset card")
