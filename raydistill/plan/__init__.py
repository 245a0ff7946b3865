"""`raydistill plan`: a sweep's teacher requests, tokens and dollars, training and evaluation
tokens and time, memory fit and statistical power, before it runs (`raydistill.plan.cli`).

Parts: `grid` (cells and trials as the sweep reads them), `teacher` (requests, tokens, prices),
`compute` (training and evaluation tokens, time, memory), `power` (smallest detectable
differences), `cli` (the command, plan.json and plan.md).
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from raydistill.plan.cli import build_plan, main, run_plan  # noqa: E402

__all__ = ["build_plan", "main", "run_plan"]
