"""What the teacher will be asked and what it costs, before anything is sent.

Requests: the annotation driver's own planner (`raydistill.annotate.pipeline._plan` over the
same `CellState`s) builds every request of the cells still to generate, with the prompt texts and
keys the run would send; those the request cache already holds are subtracted, each sample of k
and each answer-only probe is its own request, and a request shared by cells is counted once.

Input tokens: `litellm.token_counter(model, messages)` on each request's real messages, the count
litellm makes (per message 3 tokens, its role and content; 3 to prime the reply) with the tokenizer
litellm picks for the model (tiktoken's cl100k_base for OpenAI-compatible and most models; a
provider's own count can differ by a few per cent, e.g. OpenAI's o200k_base for GPT-4o).

Output tokens: estimated from the paper's released rationales of the same dataset, level and
format (`raydistill.datasets.load_train`, every released teacher that has the cell), counted with
the same litellm tokenizer, each capped at the teacher's max_tokens. The estimate is the mean over
the released teachers; its stated error is the spread of those teachers' means around it (a new
teacher may write longer or shorter than every released one: the error says how far the released
ones differ, not a bound).

Dollars: tokens x the teacher's prices: its declared ``input_cost_per_token`` /
``output_cost_per_token`` (what the annotator charges), else litellm's price table
(`litellm.model_cost` via `litellm.get_model_info`); in batch mode the batch annotator's prices
(`raydistill.annotate.batch.batch_prices`). A model without a price is "unpriced", never 0; a
teacher whose route has no batch API here has no batch price ("no batch route").
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

RELEASED_TEACHERS = ("chatgpt", "gemini", "llama")
SAMPLE_ROWS = 200  # released rationales counted per (teacher, dataset, level, format): evenly spaced


def _litellm():
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def count_input_tokens(model: str, messages: list[dict]) -> int:
    """Tokens of one request's messages, as litellm counts them for ``model``."""
    return int(_litellm().token_counter(model=model, messages=messages))


def count_text_tokens(model: str, text: str) -> int:
    return int(_litellm().token_counter(model=model, text=text))


# ------------------------------------------------------------------------------------- prices


@dataclass
class Prices:
    """USD per token; None where there is no price."""

    source: str  # "declared" | "litellm" | "unpriced"
    input: float | None = None
    output: float | None = None
    input_batch: float | None = None
    output_batch: float | None = None
    batchable: bool = True  # the teacher's litellm route has a batch API in raydistill.annotate.batch

    def usd(self, tokens_in: float, tokens_out: float, batch: bool = False) -> float | None:
        pin, pout = (self.input_batch, self.output_batch) if batch else (self.input, self.output)
        if pin is None or pout is None:
            return None
        return tokens_in * pin + tokens_out * pout


def teacher_prices(teacher, discount: float | None = None) -> Prices:
    """The prices the annotator charges a `TeacherSpec`'s requests at: synchronous, its declared
    prices, else litellm's price table for its model; in batch mode the batch annotator's own
    (`raydistill.annotate.batch.batch_prices`: litellm's batch keys, else the synchronous price x
    ``annotation.batch.discount``), None where the teacher's route has no batch API here."""
    from raydistill.annotate.batch import SUPPORTED, batch_prices, provider_of
    from raydistill.spec.annotation import BatchSpec

    discount = BatchSpec().discount if discount is None else discount
    try:
        batchable = provider_of(teacher)[0] in SUPPORTED
    except Exception:  # noqa: BLE001 - litellm knows no route for the model string
        batchable = False
    batch = batch_prices(teacher, discount) if batchable else None
    pin, pout = teacher.input_cost_per_token, teacher.output_cost_per_token
    if pin is not None or pout is not None:
        return Prices("declared", pin or 0.0, pout or 0.0, *(batch or (None, None)), batchable=batchable)
    try:
        info = _litellm().get_model_info(teacher.model)
    except Exception:  # noqa: BLE001 - litellm raises for a model it does not know
        return Prices("unpriced", batchable=batchable)
    pin, pout = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if not pin and not pout:
        return Prices("unpriced", batchable=batchable)
    return Prices("litellm", pin or 0.0, pout or 0.0, *(batch or (None, None)), batchable=batchable)


# ------------------------------------------------------------------------------- output length


@dataclass
class OutputEstimate:
    mean: float | None  # tokens per reply
    rel_error: float | None  # the released teachers' spread around the mean, relative
    per_teacher: dict[str, float] = field(default_factory=dict)
    basis: str = ""


_OUTPUT_CACHE: dict[tuple, OutputEstimate] = {}


def released_output_tokens(task: str, level: int | None, fmt: str, model: str, max_tokens: int) -> OutputEstimate:
    """Mean tokens of the released rationales of (task, level, format) per released teacher
    (answer-only when ``level`` is None), capped at ``max_tokens``; the estimate is their mean."""
    from raydistill.datasets import CellNotReleased, DataUnavailable, load_train

    key = (task, level, fmt, model, max_tokens)
    if key in _OUTPUT_CACHE:
        return _OUTPUT_CACHE[key]
    teachers = ("answer_only",) if level is None else RELEASED_TEACHERS
    per: dict[str, float] = {}
    for teacher in teachers:
        try:
            table = load_train(task, teacher, level=level, fmt=fmt)
        except (CellNotReleased, DataUnavailable, ValueError):  # ValueError: a format the release has not
            continue
        texts = table.column("rationale").to_pylist()
        if not texts:
            continue
        step = max(1, len(texts) // SAMPLE_ROWS)
        sample = texts[::step][:SAMPLE_ROWS]
        per[teacher] = statistics.fmean(min(count_text_tokens(model, t), max_tokens) for t in sample)
    if not per:
        est = OutputEstimate(None, None, basis=f"no released rationales of {task} L{level} {fmt}")
    else:
        mean = statistics.fmean(per.values())
        spread = max(abs(v - mean) for v in per.values()) / mean if mean else 0.0
        # at least the sampling error of the rationales counted (a floor of 5 %)
        est = OutputEstimate(mean, max(spread, 0.05), per,
                             f"released {'/'.join(per)} rationales of {task} "
                             f"{'answer-only' if level is None else f'L{level}'} {fmt}")
    _OUTPUT_CACHE[key] = est
    return est


# ---------------------------------------------------------------------------------- requests


@dataclass
class CellRequests:
    label: str
    teacher: str
    model: str
    planned: int = 0  # every request the cell uses (probes, k samples, padding targets)
    cached: int = 0  # of those, already in the request cache (or sent for an earlier cell of this plan)
    to_send: int = 0
    tokens_in: int = 0  # of the requests to send
    tokens_out: float = 0.0  # estimated, of the requests to send
    tokens_out_error: float = 0.0  # absolute
    unestimated: int = 0  # requests to send whose output length the release cannot estimate (not in tokens_out)
    usd_sync: float | None = None
    usd_batch: float | None = None
    prices: str = ""
    batchable: bool = True
    output_basis: str = ""
    sent: dict[str, int] = field(default_factory=dict, repr=False)  # request key -> input tokens, of to_send

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "sent"}


def plan_requests(jobs: list[tuple[str, object, Path]], discount: float | None = None) -> list[CellRequests]:
    """The requests of ``jobs`` (label, AnnotationSpec, folder) still to send, per cell, planned
    with the annotation driver's own planner: the same `CellState`s, prompts and request keys.
    A request shared by several cells is charged to the first (as the run charges it)."""
    from raydistill.annotate.cache import RequestCache
    from raydistill.annotate.pipeline import _plan, cell_states
    from raydistill.annotate.questions import question_length_levels

    if not jobs:
        return []
    first = jobs[0][1]
    cache_dir = Path(first.runtime.cache_dir) if first.runtime.cache_dir else jobs[0][2] / "request-cache"
    teachers, states = cell_states((i, spec, Path(folder)) for i, (_label, spec, folder) in enumerate(jobs))
    probe_states = [c for c in states if c.spec.hybrid and c.spec.hybrid.by == "answer_only"]
    for c in states:
        if c.spec.hybrid is None:
            c.level_of = [c.spec.level] * len(c.qids)
        elif c.spec.hybrid.by == "question_length":
            c.level_of = question_length_levels(c.questions, c.spec.hybrid)
        else:  # decided by the probes' answers: planned at the hard level (the longer prompt and reply)
            c.level_of = [c.spec.hybrid.hard_level] * len(c.qids)
    stages = [_plan(probe_states, teachers, probe=True)] if probe_states else []
    stages.append(_plan(states, teachers, probe=False))
    cached = RequestCache(cache_dir).load({k for reqs, _ in stages for k in reqs})

    out = [CellRequests(label, spec.teacher.label, spec.teacher.model) for label, spec, _ in jobs]
    charged: set[str] = set()
    for reqs, targets in stages:
        for key, req in reqs.items():
            tgts = targets[key]
            for cell in {t.cell for t in tgts}:
                out[cell].planned += 1
            owner = out[tgts[0].cell]
            if key in cached or key in charged:
                owner.cached += key in cached
                continue
            charged.add(key)
            spec = jobs[tgts[0].cell][1]
            t = teachers[req.teacher_idx]
            level = tgts[0].level
            fmt = spec.format if level is not None else "cot"
            est = released_output_tokens(spec.task, level, fmt, t.model, t.max_tokens)
            if est.mean is None and fmt != "cot":  # no released rationales in this format: its level's CoT
                est = released_output_tokens(spec.task, level, "cot", t.model, t.max_tokens)
                est = OutputEstimate(est.mean, est.rel_error, est.per_teacher,
                                     f"{est.basis} (no released {fmt} rationales at this level)")
            owner.to_send += 1
            owner.sent[key] = count_input_tokens(t.model, req.messages)
            owner.tokens_in += owner.sent[key]
            if est.mean is not None:
                owner.tokens_out += est.mean
                owner.tokens_out_error += est.mean * est.rel_error
            else:
                owner.unestimated += 1
            owner.output_basis = owner.output_basis or est.basis
    for (_label, spec, _folder), cell in zip(jobs, out):
        prices = teacher_prices(spec.teacher, discount)
        cell.prices, cell.batchable = prices.source, prices.batchable
        cell.usd_sync = prices.usd(cell.tokens_in, cell.tokens_out)
        cell.usd_batch = prices.usd(cell.tokens_in, cell.tokens_out, batch=True)
    return out
