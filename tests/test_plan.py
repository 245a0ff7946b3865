"""`raydistill plan` without a teacher: a replay-only sweep (grid counts, training and evaluation
tokens, the power section), an annotate config with a priced and an unpriced model and a request
cache that holds part of it. The plan against a real run of the local OpenAI-compatible server is
in tests/test_annotate_ray.py (test_cost_is_attributed_once_per_run_and_every_response_is_priced)."""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import prompts, stats
from raydistill.plan import main as plan_main
from raydistill.plan.power import detectable_difference, sign_test_power

REPO = Path(__file__).resolve().parents[1]


def test_replay_only_sweep_plans_its_grid_and_power_without_a_teacher(tmp_path, capsys):
    """sweeps/granularity.py --plan on the demo's config: 3 released cells, 3 trials, no request,
    the report's comparisons (2 neighbouring levels, 3 level pairs, 3 cells against the constant
    answer) at 40 questions, each with the plan's smallest detectable difference."""
    from raydistill.sweep.cli import main as sweep_main

    assert sweep_main(["--config", str(REPO / "sweeps" / "granularity.yaml"), "--plan",
                       "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "teacher requests            0 to send" in printed
    run = tmp_path / "granularity"
    plan = json.loads((run / "plan.json").read_text())
    assert "| trials | 3 |" in (run / "plan.md").read_text()
    assert not (run / "trials").exists()  # nothing ran
    grid = plan["grid"]
    assert grid["trials"] == 3 and grid["cells"] == {"replay": 3, "cached": 0, "generate": 0, "missing": 0}
    assert grid["test_questions"] == {"svamp": 40} and grid["seeds"] == [100]
    assert plan["teacher"]["totals"]["requests"] == 0 and plan["teacher"]["totals"]["usd_sync"] == 0
    # Training: 64 rows per cell x 1 epoch, tokens counted on the rows; evaluation at the limit.
    trials = plan["compute"]["trials"]
    assert len(trials) == 3 and all(t["rows"] == 64 and t["train_tokens"] > 64 for t in trials)
    assert all(t["generate_limit"] == 40 * 384 and 0 < t["generate_expected"] <= t["generate_limit"] for t in trials)
    # Statistics: the report's families, and the smallest detectable Δ at 40 questions.
    stats_ = plan["statistics"]
    families = {f: v["comparisons"] for f, v in stats_["families"].items()}
    assert families == {"levels": 2, "all_levels": 3, "baseline": 3}
    mdd = detectable_difference(40)
    assert all(c["n"] == 40 and c["mdd"] == pytest.approx(mdd) for c in stats_["comparisons"])
    assert stats_["families"]["levels"]["mdd_holm"]["40"] is None  # at alpha/2 no Δ <= psi reaches 80 %
    # None of the paper's GSM8K differences can be judged on an SVAMP grid.
    assert stats_["published"] and all(p["detectable"] is None for p in stats_["published"])


def test_sign_test_power_matches_enumeration():
    """The exact power of the two-sided sign test against enumerating every 2x2 table of n = 12
    paired questions (multinomial over both right or both wrong, only b right, only a right) and
    testing each with raydistill.stats.sign_test."""
    n, psi, delta, alpha = 12, 0.4, 0.25, 0.05
    p10, p01 = (psi + delta) / 2, (psi - delta) / 2
    power = 0.0
    for wins, losses in itertools.product(range(n + 1), repeat=2):
        if wins + losses > n:
            continue
        same = n - wins - losses
        prob = (math.factorial(n) / (math.factorial(wins) * math.factorial(losses) * math.factorial(same))
                * p10 ** wins * p01 ** losses * (1 - psi) ** same)
        if wins + losses and stats.sign_test([1] * wins + [-1] * losses).p_value <= alpha:
            power += prob
    assert sign_test_power(n, delta, psi, alpha) == pytest.approx(power, rel=1e-9)
    # and the smallest detectable Δ reaches 80 %, a hair less does not, never below the floor
    d = detectable_difference(300)
    assert sign_test_power(300, d, 0.2) >= 0.8 > sign_test_power(300, d - 0.002, 0.2)
    assert d >= stats.min_detectable_difference(300)


def _annotate_config(tmp_path: Path, teacher: str, n: int = 6) -> Path:
    questions = [f"Question {i}: Ann has {i + 2} apples and gets {3 * i + 1} more. How many now?" for i in range(n)]
    qpath = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"question": questions, "answer": [str(4 * i + 3) for i in range(n)]}), qpath)
    cfg = tmp_path / "annotate.yaml"
    cfg.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / 'out'}
        teacher: {teacher}
        questions: {{source: parquet, path: "{qpath}"}}
        cells:
          - {{task: svamp, level: 3}}
          - {{task: svamp, level: 1, pad: {{to_level: 5}}}}
    """))
    return cfg


def test_priced_model_plans_litellm_prices_and_subtracts_the_request_cache(tmp_path, capsys):
    """gpt-4o-mini from litellm's price table: dollars at its synchronous and batch prices, the
    same as litellm's cost_per_token at those tokens; a response already in the request cache is
    not planned again."""
    import litellm

    from raydistill.annotate import RequestCache, load_config
    from raydistill.plan.teacher import count_input_tokens, plan_requests, teacher_prices

    cfg = _annotate_config(tmp_path, "{model: openai/gpt-4o-mini, max_tokens: 512}")
    assert plan_main(["--config", str(cfg)]) == 0
    first = json.loads((tmp_path / "out" / "plan.json").read_text())["teacher"]["totals"]
    assert first["requests"] == 6 * 3  # L3, L1 and the L5 padding targets (L1 shared by both cells)
    jobs = [(s.cell_name(), s, d) for s, d in load_config(cfg).expand()]
    cells = plan_requests(jobs)
    sent = {k: v for c in cells for k, v in c.sent.items()}
    assert sum(sent.values()) == first["tokens_in"]
    # each request's tokens are litellm's count of the messages the annotator's prompt code builds
    spec, question = jobs[0][1], "Question 0: Ann has 2 apples and gets 1 more. How many now?"
    messages = prompts.build_messages("svamp", 3, "cot", question, spec.prompt_dir, None)
    assert count_input_tokens("openai/gpt-4o-mini", messages) in sent.values()
    sync_in, sync_out = litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=first["tokens_in"],
                                               completion_tokens=first["tokens_out"])
    assert first["usd_sync"] == pytest.approx(sync_in + sync_out, abs=1e-4)
    price = litellm.model_cost["gpt-4o-mini"]
    assert first["usd_batch"] == pytest.approx(first["tokens_in"] * price["input_cost_per_token_batches"]
                                               + first["tokens_out"] * price["output_cost_per_token_batches"], abs=1e-4)
    assert 0 < first["usd_batch"] < first["usd_sync"]
    # a teacher with declared prices: batch at the batch annotator's discount; a route without a
    # batch API (Gemini through litellm's gemini route) has no batch price
    from raydistill.spec.annotation import TeacherSpec

    declared = teacher_prices(TeacherSpec(model="openai/x", input_cost_per_token=1e-6, output_cost_per_token=2e-6), 0.5)
    assert (declared.usd(1000, 100), declared.usd(1000, 100, batch=True)) == pytest.approx((1.2e-3, 0.6e-3))
    gemini = teacher_prices(TeacherSpec(model="gemini/gemini-1.5-flash", input_cost_per_token=1e-7,
                                        output_cost_per_token=3e-7))
    assert gemini.usd(10, 10) == pytest.approx(4e-6) and gemini.usd(10, 10, batch=True) is None
    assert not gemini.batchable

    # One of the requests is in the cache already: the plan leaves it out.
    key = next(iter(sent))
    RequestCache(tmp_path / "out" / "request-cache").writer().append(
        {"key": key, "model": "openai/gpt-4o-mini", "response": "x The answer is 3", "tokens_in": sent[key],
         "tokens_out": 5, "cost_usd": 0.0, "latency_s": 0.1, "finish_reason": "stop", "t": 0})
    again = {k for c in plan_requests(jobs) for k in c.sent}
    assert again == set(sent) - {key}
    capsys.readouterr()


def test_unpriced_model_is_unpriced_never_zero(tmp_path, capsys):
    cfg = _annotate_config(tmp_path, '{model: openai/my-local-model, api_base: "http://127.0.0.1:9/v1"}')
    assert plan_main(["--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    totals = json.loads((tmp_path / "out" / "plan.json").read_text())["teacher"]["totals"]
    assert totals["requests"] == 18 and totals["tokens_in"] > 0
    assert totals["usd_sync"] == "unpriced" and totals["usd_batch"] == "unpriced"
    assert totals["unpriced_teachers"] == ["my-local-model"]
    assert "synchronous unpriced, batch unpriced" in printed
    assert "Unpriced (no price" in (tmp_path / "out" / "plan.md").read_text()


def test_bad_throughput_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "rates.yaml"
    bad.write_text("rows:\n  - {student: smollm2-135m, device: cpu-core, train_tokens_per_s: fast}\n")
    assert plan_main(["--config", str(REPO / "sweeps" / "granularity.yaml"), "--output-dir", str(tmp_path),
                      "--throughput", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "rows[0].train_tokens_per_s" in err[0]


def test_sweep_with_a_generating_teacher_plans_its_cells_k_samples_and_test_sets(tmp_path, capsys):
    """A sweep whose teacher writes new cells (levels 1 and 3, 8 questions, 2 samples per
    question): 2 cells to generate, 2 x 8 x 2 requests, priced at the declared prices, the training
    rows estimated from the release; nothing is sent (the endpoint does not exist)."""
    import yaml

    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gen", "output_dir": str(tmp_path / "outputs"), "datasets": ["svamp"], "teachers": ["local"],
        "levels": [1, 3], "students": ["smollm2-135m"], "train_limit": 8, "test_limit": 10,
        "annotation": {"teachers": {"local": {"model": "openai/local", "api_base": "http://127.0.0.1:9/v1",
                                              "temperature": 0.7, "input_cost_per_token": 1e-6,
                                              "output_cost_per_token": 2e-6}},
                       "samples": 2},
        "train": {"epochs": 2}, "eval": {"max_new_tokens": 100}}))
    assert plan_main(["--config", str(config)]) == 0
    plan = json.loads((tmp_path / "outputs" / "gen" / "plan.json").read_text())
    assert plan["grid"]["cells"]["generate"] == 2 and plan["grid"]["trials"] == 2
    teacher = plan["teacher"]["totals"]
    assert teacher["requests"] == 2 * 8 * 2 and teacher["tokens_in"] > 0
    assert teacher["usd_sync"] == pytest.approx(teacher["tokens_in"] * 1e-6 + teacher["tokens_out"] * 2e-6, abs=1e-4)
    assert teacher["usd_batch"] == pytest.approx(teacher["usd_sync"] / 2, abs=1e-4)
    trials = plan["compute"]["trials"]
    assert all(t["rows_basis"].startswith("estimated") and t["rows"] == 8 and t["epochs"] == 2 for t in trials)
    assert all(t["generate_limit"] == 10 * 100 for t in trials)
    assert not (tmp_path / "outputs" / "request-cache").exists()  # nothing was sent or cached
    capsys.readouterr()
