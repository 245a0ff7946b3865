"""`raydistill plan`: what a sweep will ask of the teacher, the GPUs and the statistics, before it runs.

    raydistill plan --config sweeps/paper.yaml [--set KEY=VALUE ...]
    python sweeps/granularity.py --plan [--config ...]

Reads the sweep's cells and test sets as the sweep would, calls no teacher and trains nothing;
prints a table and writes plan.json and plan.md to the sweep's output folder
(<output_dir>/<name>/). Sections: the grid, the teacher (requests still to send, tokens, dollars at
synchronous and batch prices), training and evaluation (tokens, time from the throughput table),
memory (the fit check where GPU memory is declared), statistics (the smallest detectable
difference of every comparison the report will run, and the paper's differences the grid cannot
detect). docs/annotate.md, "Plan before you run", says how each number is made.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from raydistill import files


def build_plan(spec, device: str | None = None, throughput: str | None = None,
               discordance: float | None = None) -> dict:
    from raydistill.plan.compute import plan_compute
    from raydistill.plan.grid import plan_grid
    from raydistill.plan.power import DEFAULT_DISCORDANCE, power_section
    from raydistill.plan.teacher import plan_requests

    grid = plan_grid(spec)
    jobs = [(c.cell.label, c.annotation, c.folder) for c in grid.cells if c.status == "generate"]
    requests = plan_requests(jobs, spec.annotation.batch.discount)
    teacher = _teacher_totals(requests)
    compute = plan_compute(grid, spec, device, throughput)
    power = power_section(grid.trials, grid.test_questions, discordance or DEFAULT_DISCORDANCE)
    return {"sweep": spec.name, "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "grid": grid.to_dict(),
            "teacher": {"totals": teacher, "cells": [r.to_dict() for r in requests],
                        "cached_cells": [c.cell.label for c in grid.cells if c.status == "cached"]},
            "compute": {"totals": compute.totals, "tokenizers": compute.tokenizers,
                        "throughput": compute.throughput, "trials": compute.trials},
            "memory": compute.memory, "statistics": power}


def build_annotate_plan(cfg) -> dict:
    """The teacher section alone, for a `raydistill annotate` config: its cells' requests still to
    send (a finished cell of the same hash sends nothing)."""
    from raydistill.annotate.cells import reuse_finished_cell
    from raydistill.plan.teacher import plan_requests

    jobs, cached = [], []
    for spec, folder in cfg.expand():
        if reuse_finished_cell(spec, Path(folder)) is not None:
            cached.append(spec.cell_name())
        else:
            jobs.append((spec.cell_name(), spec, Path(folder)))
    requests = plan_requests(jobs, cfg.batch.discount)
    return {"annotate": cfg.output_dir, "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "teacher": {"totals": _teacher_totals(requests), "cells": [r.to_dict() for r in requests],
                        "cached_cells": cached}}


def _teacher_totals(requests) -> dict:
    totals = {"requests": sum(r.to_send for r in requests), "cached": sum(r.cached for r in requests),
              "tokens_in": sum(r.tokens_in for r in requests),
              "tokens_out": round(sum(r.tokens_out for r in requests)),
              "tokens_out_error": round(sum(r.tokens_out_error for r in requests)),
              "tokens_out_unestimated_requests": sum(r.unestimated for r in requests)}
    for kind in ("sync", "batch"):
        values = [getattr(r, f"usd_{kind}") for r in requests if r.to_send]
        none = "no batch route" if kind == "batch" and any(not r.batchable for r in requests if r.to_send) \
            else "unpriced"
        totals[f"usd_{kind}"] = (none if any(v is None for v in values) else round(sum(values), 4))
        lo = [v for v in values if v is not None]
        if any(v is None for v in values) and lo:
            totals[f"usd_{kind}_priced_part"] = round(sum(lo), 4)
    totals["unpriced_teachers"] = sorted({r.teacher for r in requests if r.to_send and r.usd_sync is None})
    return totals


# ------------------------------------------------------------------------------------ output


def _usd(value) -> str:
    return value if isinstance(value, str) else f"${value:,.2f}"


def _pp(value) -> str:
    return "none possible" if value is None or math.isinf(value) else f"{100 * value:.1f} pp"


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:,.1f} h"


def _no_batch(cell: dict) -> str:
    return "unpriced" if cell["batchable"] else "no batch route"


def _yes_no(value) -> str:
    return "–" if value is None else ("yes" if value else "no")


def teacher_markdown(plan: dict) -> list[str]:
    t = plan["teacher"]["totals"]
    lines = ["## Teacher", "",
             "| requests to send | already cached | input tokens | output tokens (estimated) | USD synchronous | USD batch |",
             "|---|---|---|---|---|---|",
             f"| {t['requests']:,} | {t['cached']:,} | {t['tokens_in']:,} | {t['tokens_out']:,} ± {t['tokens_out_error']:,} "
             f"| {_usd(t['usd_sync'])} | {_usd(t['usd_batch'])} |", ""]
    if t["unpriced_teachers"]:
        lines += [f"Unpriced (no price in litellm's table or the config): {', '.join(t['unpriced_teachers'])}.", ""]
    if t["tokens_out_unestimated_requests"]:
        lines += [f"{t['tokens_out_unestimated_requests']:,} requests have no released rationales to estimate their "
                  "output from: their output tokens (and dollars) are not in the totals.", ""]
    if plan["teacher"]["cached_cells"]:
        lines += [f"Finished cells (nothing to send): {', '.join(plan['teacher']['cached_cells'])}.", ""]
    cells = [r for r in plan["teacher"]["cells"] if r["to_send"] or r["cached"]]
    if cells:
        lines += ["| cell | requests | cached | input tokens | output tokens | USD sync | USD batch | output basis |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cells:
            lines.append(f"| {r['label']} | {r['to_send']} | {r['cached']} | {r['tokens_in']:,} | "
                         f"{round(r['tokens_out']):,} ± {round(r['tokens_out_error']):,} | "
                         f"{_usd(r['usd_sync']) if r['usd_sync'] is not None else 'unpriced'} | "
                         f"{_usd(r['usd_batch']) if r['usd_batch'] is not None else _no_batch(r)} | "
                         f"{r['output_basis']} |")
        lines.append("")
    return lines


def markdown(plan: dict) -> str:
    if "grid" not in plan:  # an annotate config: the teacher alone
        return "\n".join([f"# Plan of annotation into {plan['annotate']}", "",
                          "Made by `raydistill plan` before the run: no teacher was called.", ""]
                         + teacher_markdown(plan)) + "\n"
    g, c, s = plan["grid"], plan["compute"]["totals"], plan["statistics"]
    lines = [f"# Plan of sweep {plan['sweep']}", "",
             "Made by `raydistill plan` before the run: no teacher was called, nothing was trained.", "",
             "## Grid", "", "| what | count |", "|---|---|",
             f"| trials | {g['trials']} |",
             f"| annotation cells replayed from the release | {g['cells']['replay']} |",
             f"| generated cells already finished (cached) | {g['cells']['cached']} |",
             f"| cells to generate | {g['cells']['generate']} |",
             f"| released cells missing (left out) | {g['cells']['missing']} |",
             f"| seeds | {', '.join(map(str, g['seeds']))} |",
             f"| test questions per task | {', '.join(f'{k} {v}' for k, v in g['test_questions'].items())} |", ""]
    lines += [f"- {note}" for note in g["notes"]]
    lines += teacher_markdown(plan)
    lines += ["## Training and evaluation", "",
              f"Device: {c['device']}. Training tokens {c['train_tokens']:,.0f} (all trials, x epochs); generated "
              f"tokens {c['generate_expected']:,.0f} expected, {c['generate_limit']:,} at the protocol's limit.", ""]
    if c["timed_trials"]:
        lines += [f"Time ({c['timed_trials']} of {c['trials']} trials have a throughput row): training "
                  f"{_hours(c['train_s'])}, evaluation {_hours(c['eval_s'])} (trial-hours); at "
                  f"max_concurrent_trials, at least {_hours(c['wall_s_lower_bound'])} of wall time; "
                  f"GPU-hours {c['gpu_hours']:,.1f}. Tokens over throughput only: each trial's start (Ray "
                  "Train workers, DeepSpeed, model load, evaluation engine) comes on top.", ""]
    lines += ["| student | device | kind | train tokens/s | generate tokens/s | source |", "|---|---|---|---|---|---|"]
    for r in plan["compute"]["throughput"]:
        lines.append(f"| {r['student']} | {r['device']} | {r['kind']} | {r.get('train_tokens_per_s', '–')} | "
                     f"{r.get('generate_tokens_per_s', '–')} | {r.get('source', r.get('note', ''))} |")
    lines.append("")
    lines += [f"- {s_}: {v['note']}" for s_, v in plan["compute"]["tokenizers"].items() if v["note"]]
    lines += ["", "## Memory", "", _memory_text(plan["memory"]), "", "## Statistics", "", f"Method: {s['method']}.", "",
              "| family | comparisons | questions | smallest detectable Δ (α) | at Holm's α/m |", "|---|---|---|---|---|"]
    for fam, f in s["families"].items():
        for n in f["questions"]:
            lines.append(f"| {fam} | {f['comparisons']} | {n} | {_pp(f['mdd'][n])} | {_pp(f['mdd_holm'][n])} |")
    lines += ["", "The paper's published differences:", "",
              "| difference | published | questions | comparison | smallest detectable Δ | detectable |",
              "|---|---|---|---|---|---|"]
    for p in s["published"]:
        lines.append(f"| {p['difference']} | {p['published_pp']:+.2f} pp | {p['n'] or '–'} | {p['family']} | "
                     f"{_pp(p['mdd']) if p['n'] else '–'} | {_yes_no(p['detectable'])} |")
    return "\n".join(lines) + "\n"


def _memory_text(memory: dict) -> str:
    if not memory.get("checked"):
        return f"Not checked: {memory['note']}."
    if not memory.get("fits"):
        return f"Does not fit: {memory['error']}"
    return f"Every one of the {memory['trials']} trials that declare GPU memory fits (raydistill.sweep.fit)."


def table(plan: dict) -> str:
    t = plan["teacher"]["totals"]
    teacher_rows = [("teacher requests", f"{t['requests']:,} to send ({t['cached']:,} cached)"),
                    ("teacher tokens", f"{t['tokens_in']:,} in, {t['tokens_out']:,} ± {t['tokens_out_error']:,} out "
                                       "(estimated" + (f"; {t['tokens_out_unestimated_requests']:,} requests without an "
                                                       "estimate left out" if t["tokens_out_unestimated_requests"]
                                                       else "") + ")"),
                    ("teacher USD", f"synchronous {_usd(t['usd_sync'])}, batch {_usd(t['usd_batch'])}")]
    if "grid" not in plan:
        return _aligned(teacher_rows)
    g, c = plan["grid"], plan["compute"]["totals"]
    judged = [p for p in plan["statistics"]["published"] if p["detectable"] is not None]
    cant = [p for p in judged if not p["detectable"]]
    rows = [("trials", f"{g['trials']}"),
            ("cells", f"{g['cells']['replay']} replayed, {g['cells']['cached']} cached, {g['cells']['generate']} to generate, "
                      f"{g['cells']['missing']} missing"),
            ("test questions", ", ".join(f"{k} {v}" for k, v in g["test_questions"].items())),
            ("seeds", ", ".join(map(str, g["seeds"]))),
            *teacher_rows,
            ("training tokens", f"{c['train_tokens']:,.0f}"),
            ("generated tokens", f"{c['generate_expected']:,.0f} expected, {c['generate_limit']:,} at the limit"),
            ("time", (f"training {_hours(c['train_s'])}, evaluation {_hours(c['eval_s'])} on {c['device']} "
                      f"({c['timed_trials']}/{c['trials']} trials timed; tokens only, trial start-up not "
                      f"included), GPU-hours {c['gpu_hours']:,.1f}")
             if c["timed_trials"] else f"no throughput row for {c['device']}"),
            ("memory", _memory_text(plan["memory"])),
            ("published Δ not detectable", f"{len(cant)} of the {len(judged)} on this grid's datasets"
                                            + (f" ({', '.join(p['difference'] for p in cant[:3])}"
                                               + (", ..." if len(cant) > 3 else "") + ")" if cant else ""))]
    return _aligned(rows)


def _aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_plan(plan: dict, run_dir) -> tuple:
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(run_dir / "plan.json", _jsonable(plan), indent=1)
    files.write_text(run_dir / "plan.md", markdown(plan))
    return run_dir / "plan.json", run_dir / "plan.md"


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return None  # no difference can be detected
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_plan(spec, device=None, throughput=None, discordance=None) -> dict:
    plan = build_plan(spec, device, throughput, discordance)
    paths = write_plan(plan, spec.run_dir)
    print(table(plan))
    print(f"plan          : {paths[0]} and {paths[1].name}")
    return plan


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="the throughput table's device for the time estimate (default: h100 when "
                             "train.use_gpu, else cpu-core)")
    parser.add_argument("--throughput", default=None, metavar="FILE",
                        help="YAML rows {student, device, train_tokens_per_s, generate_tokens_per_s, kind, source} "
                             "added to raydistill/data/throughput.yaml")
    parser.add_argument("--discordance", type=float, default=None,
                        help="assumed share of questions two compared cells disagree on (default 0.20)")


def _is_annotate_config(path: str) -> bool:
    """A `raydistill annotate` config (a teacher, no students) rather than a sweep's."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the sweep loader says what is wrong with it
    return isinstance(raw, dict) and "teacher" in raw and "students" not in raw


def main(argv: list[str]) -> int:
    from raydistill.plan.compute import PlanInputError
    from raydistill.spec import load_sweep, parse_overrides
    from raydistill.sweep.cli import USER_ERRORS

    parser = argparse.ArgumentParser(prog="raydistill plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="sweep YAML (see sweeps/*.yaml); a raydistill annotate YAML plans its teacher requests alone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, as for raydistill sweep")
    parser.add_argument("--output-dir", default=os.environ.get("RAYDISTILL_OUTPUT_DIR"),
                        help="parent folder of the sweep's outputs, as for raydistill sweep")
    add_options(parser)
    args = parser.parse_args(argv)
    if args.discordance is not None and not 0 < args.discordance <= 1:
        print(f"error: --discordance {args.discordance}: give a share in (0, 1], e.g. 0.2", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        if _is_annotate_config(args.config):
            from raydistill.annotate import load_config

            cfg = load_config(args.config, overrides or None)
            plan = build_annotate_plan(cfg)
            paths = write_plan(plan, Path(cfg.output_dir))
            print(table(plan))
            print(f"plan          : {paths[0]} and {paths[1].name}")
            return 0
        spec = load_sweep(args.config, overrides)
        run_plan(spec, args.device, args.throughput, args.discordance)
    except (*USER_ERRORS, PlanInputError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
