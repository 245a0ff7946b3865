"""`raydistill annotate --config x.yaml`: runs an annotate config and prints a summary per cell.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from raydistill import files, prompts
from raydistill.annotate.cache import CacheWriteError
from raydistill.annotate.cells import AnnotationResult, reuse_finished_cell
from raydistill.annotate.pipeline import annotate_cells
from raydistill.annotate.spend import SpendCapReached, check_priced
from raydistill.spec.annotation import load_config
from raydistill.spec.base import SpecError

log = logging.getLogger(__name__)


def spent_usd(totals: dict[str, Any]) -> float:
    """What a run paid its teachers: every request it sent, answer-only probes and padding targets
    included (the cells' ``new_cost_usd`` add up to it)."""
    return float(totals.get("new_cost_usd", 0.0)) + float(totals.get("probe_new_cost_usd", 0.0))


def summary_table(results: Sequence[AnnotationResult]) -> str:
    head = ["cell", "rows", "failed", "cache hits", "sent", "tokens in", "tokens out", "cost $", "spent now $",
            "teacher acc", "mean words", "cut at max_tokens", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = f"{100 * r.teacher_accuracy:.1f}%" if r.teacher_accuracy is not None else "-"
        words = f"{r.mean_rationale_words:.1f}" if r.mean_rationale_words is not None else "-"
        lines.append(
            f"| {r.cell_name}{' (reused)' if r.reused else ''} | {r.rows} | {r.failed} | {r.cache_hits} | "
            f"{r.requests_sent} | {r.tokens_in} | {r.tokens_out} | {r.cost_usd:.4f} | {r.new_cost_usd:.4f} | "
            f"{acc} | {words} | {r.truncated} | {r.wall_time_s:.1f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill annotate", description="Generate teacher annotations (litellm on Ray Data).")
    p.add_argument("--config", required=True, help="annotate YAML (see docs/annotate.md)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--limit", type=int, help="annotate only the first N questions of each cell")
    p.add_argument("--overwrite", action="store_true", help="run cells even if their outputs exist")
    p.add_argument("--retry-failed", action="store_true",
                   help="run finished cells with failed rows again, sending only those rows")
    p.add_argument("--max-spend", type=float, metavar="USD",
                   help="stop before this run spends more than USD on its teachers (over all cells; overrides "
                        "max_spend_usd): in-flight requests finish, answered rows are written, exit status 3")
    p.add_argument("--dry-run", action="store_true", help="print the cells and cache hits, send nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="also write the per-cell results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.limit:
        overrides["questions.limit"] = args.limit
    try:
        cfg = load_config(args.config, overrides)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    cells = cfg.expand()
    if args.dry_run:
        for spec, out in cells:
            done = reuse_finished_cell(spec, out) is not None
            print(f"{spec.cell_name():<48} {spec.cell_hash()[:12]}  {out}{'  (done)' if done else ''}")
        return 0
    if args.max_spend is not None and args.max_spend <= 0:
        print(f"--max-spend: {args.max_spend} is not a positive amount of USD", file=sys.stderr)
        return 2
    cap = args.max_spend if args.max_spend is not None else cfg.max_spend_usd
    try:  # before any request: a cap on a teacher without a price is refused
        check_priced([spec.teacher for spec, _ in cells[:1]], cap,
                     "--max-spend" if args.max_spend is not None else "max_spend_usd")
    except SpecError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    try:
        run = annotate_cells(cells, overwrite=args.overwrite, retry_failed=args.retry_failed,
                             progress=not args.no_progress, max_spend_usd=cap, mode=cfg.mode, batch=cfg.batch)
    except (SpecError, prompts.PromptError) as e:
        print(str(e), file=sys.stderr)
        return 2
    except CacheWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pending = "; batches still pending are listed in their cells' batches.json" if cfg.mode == "batch" else ""
        print(f"stopped{pending}; the same command resumes (answered requests come from the cache)", file=sys.stderr)
        return 130
    except SpendCapReached as e:
        if args.json and e.run is not None:
            files.write_json(args.json, {"cells": [r.to_dict() for r in e.run.cells], "totals": e.run.totals})
        print(str(e), file=sys.stderr)
        return 3
    print(summary_table(run.cells))
    t = run.totals
    if "requests" in t:
        probes = t.get("probe_requests", 0)
        print(f"\n{t.get('requests', 0) + probes} unique requests{f' ({probes} answer-only probes)' if probes else ''}: "
              f"{t.get('cache_hits', 0) + t.get('probe_cache_hits', 0)} cache hits, "
              f"{t.get('api_calls', 0) + t.get('probe_api_calls', 0)} API calls, "
              f"{t.get('failed', 0) + t.get('probe_failed', 0)} failed; spent ${spent_usd(t):.4f}; "
              f"wall {t.get('wall_time_s', 0.0):.1f} s")
        if cfg.mode == "batch":
            print(f"batch mode: {t.get('batches_created', 0) + t.get('probe_batches_created', 0)} batch(es) created, "
                  f"{t.get('batch_rows', 0) + t.get('probe_batch_rows', 0)} rows answered in batches, "
                  f"{t.get('batch_resent', 0) + t.get('probe_batch_resent', 0)} failed or expired rows sent again "
                  f"({cfg.batch.resend}), {t.get('batch_failed', 0) + t.get('probe_batch_failed', 0)} failed for good")
    if args.json:
        files.write_json(args.json, {"cells": [r.to_dict() for r in run.cells], "totals": t})
    return 0


if __name__ == "__main__":
    sys.exit(main())
