"""`raydistill data`: list, export, export-hf, ceiling, check-contamination and pin subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from raydistill import files
from raydistill.datasets.mirror import (
    ENV_DATA_DIR,
    MANIFEST,
    DataUnavailable,
    MalformedData,
    build_manifest,
    local_path,
)
from raydistill.datasets.hf_export import TOKEN_ENV, export_hf
from raydistill.datasets.overlap import contamination
from raydistill.datasets.release import FORMATS, LEVELLESS, LEVELS, TEACHERS, available_cells, cell_name
from raydistill.datasets.tables import load_test, load_train, load_train_variants, target_ceiling, write_parquet
from raydistill.tasks import TASKS, get_task


def _cmd_list(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else list(TASKS):
        task = get_task(name)
        test = local_path(task.test.path)
        print(f"{name} ({task.kind})  test: {task.test.path}  "
              f"[{test[1] if test else 'not available offline'}]")
        for c in available_cells(name):
            level = f"L{c.level}" if c.level else "-"
            print(f"  {c.teacher:<12} {level:<3} {c.format:<4} "
                  f"{c.where or 'not available offline':<22} {c.path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.split == "test":
        table = load_test(args.task)
    else:
        table = load_train(args.task, args.teacher, args.level, args.format, repair=args.repair)
    write_parquet(table, args.out)
    print(f"wrote {table.num_rows} rows to {args.out}")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    ex = export_hf(args.cell, args.out, push_to_hub=args.push_to_hub, private=args.private, overwrite=args.overwrite)
    print(f"wrote {ex.table.num_rows} rows of {ex.parquet} and the dataset card to {args.out}"
          + (f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _cmd_ceiling(args: argparse.Namespace) -> int:
    """Target ceiling of every released cell on this machine (as released, and repaired)."""
    print(f"{'task':<11}{'cell':<18}{'rows':>6}  {'ceiling':>8}  {'repaired':>8}  file")
    for name in [args.task] if args.task else list(TASKS):
        for c in available_cells(name):
            cell = cell_name((c.teacher, c.level, c.format))
            if not c.offline:
                print(f"{name:<11}{cell:<18}{'':>6}  {'':>8}  {'':>8}  {c.path} (not available offline)")
                continue
            tables = load_train_variants(name, c.teacher, c.level, c.format)  # one reading, both variants
            print(f"{name:<11}{cell:<18}{tables[False].num_rows:>6}  {_share(target_ceiling(name, tables[False])):>8}  "
                  f"{_share(target_ceiling(name, tables[True])):>8}  {c.path}")
    return 0


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _cmd_contamination(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else list(TASKS):
        print(contamination(name).to_text())
    return 0


def _cmd_pin(args: argparse.Namespace) -> int:
    if not args.mirror:
        raise ValueError(f"pin needs --mirror or {ENV_DATA_DIR}")
    manifest = build_manifest(Path(args.mirror))
    files.write_json(args.out, manifest, indent=1)
    print(f"pinned {len(manifest['files'])} files to {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from raydistill import datasets  # its docstring's first line describes the command

    p = argparse.ArgumentParser(prog="raydistill data", description=datasets.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="training cells per task and where their files are")
    ls.add_argument("--task", choices=list(TASKS))
    ls.set_defaults(run=_cmd_list)
    ex = sub.add_parser("export", help="write one training cell or a test set as Parquet")
    ex.add_argument("--task", choices=list(TASKS), required=True)
    ex.add_argument("--split", choices=("train", "test"), default="train")
    ex.add_argument("--teacher", choices=TEACHERS + LEVELLESS, default="chatgpt")
    ex.add_argument("--level", type=int, choices=LEVELS)
    ex.add_argument("--format", choices=FORMATS, default="cot")
    ex.add_argument("--out", required=True)
    ex.add_argument("--repair", action="store_true",
                    help="repair the targets (LaTeX escapes eaten by JSON, unmarked final answers); see docs/grading.md")
    ex.set_defaults(run=_cmd_export)
    hf = sub.add_parser("export-hf", help="write a cell's training rows or a trial's predictions as a Hugging Face "
                                          "datasets folder (save_to_disk) with a dataset card (README.md)")
    hf.add_argument("cell", metavar="CELL", help="an annotation cell folder (outputs/cells/<hash>/), a trial folder "
                                                 "(outputs/<sweep>/trials/<hash>/), or the Parquet file in one")
    hf.add_argument("out", metavar="OUT", help="the folder to write; datasets.load_from_disk(OUT) reads it")
    hf.add_argument("--push-to-hub", metavar="REPO",
                    help=f"also push the rows and the card to this Hub dataset repository (token from ${TOKEN_ENV})")
    hf.add_argument("--private", action="store_true", help="with --push-to-hub: a new repository is private")
    hf.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    hf.set_defaults(run=_cmd_export_hf)
    ce = sub.add_parser("ceiling", help="target ceiling per cell: the share of its training targets graded "
                                         "correct against their own answers (as released and repaired)")
    ce.add_argument("--task", choices=list(TASKS))
    ce.set_defaults(run=_cmd_ceiling)
    cc = sub.add_parser("check-contamination", help="train/test question overlap per file")
    cc.add_argument("--task", choices=list(TASKS))
    cc.set_defaults(run=_cmd_contamination)
    pin = sub.add_parser("pin", help="write upstream.json (sha256 of each file) from a mirror")
    pin.add_argument("--mirror", default=os.environ.get(ENV_DATA_DIR),
                     help=f"mirror folder (default: ${ENV_DATA_DIR})")
    pin.add_argument("--out", default=str(MANIFEST))
    pin.set_defaults(run=_cmd_pin)
    return p


def main(argv: list[str]) -> int:
    """`raydistill data list | export | export-hf | ceiling | check-contamination | pin`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except (DataUnavailable, MalformedData, ValueError) as exc:
        print(f"raydistill data: {exc}", file=sys.stderr)
        return 1
