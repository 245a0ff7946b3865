"""Annotation stage end to end: a real local Ray cluster, the OpenAI-compatible test server over
HTTP, litellm, real Parquet. Assertions about what was sent come from the server's request log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from openai_server import ServerProcess

from raydistill import annotate as A
from raydistill import prompts
from raydistill.schemas import ANNOTATION_SCHEMA, EXAMPLE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "sk-sentinel-7f3c9a1e-do-not-write"
KEY_ENV = "RAYDISTILL_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def ray_cluster():
    """One 2-CPU local cluster for the module. The teacher key is in the environment before the
    cluster starts, so its workers inherit it (as they would on a real cluster)."""
    import ray

    os.environ[KEY_ENV] = SENTINEL
    ray.shutdown()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ctx
    ray.shutdown()


def make_questions(tmp_path: Path, n: int) -> tuple[Path, dict[str, str]]:
    """n SVAMP-like questions with gold answers, as a Parquet the spec can point at; some are
    longer than others (hybrid by question length)."""
    import pyarrow as pa

    qs, golds = [], []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        extra = " They were all counted twice to be sure." * (i % 3)
        qs.append(f"Question {i}: A farmer has {a} sheep and buys {b} more.{extra} How many sheep now?")
        golds.append(str(a + b))
    path = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"question": qs, "answer": golds}), path)
    return path, dict(zip(qs, golds))


def spec_for(server: ServerProcess, qpath: Path, n: int, level: int = 3, timeout_s: float = 1.0,
             **runtime) -> A.AnnotationSpec:
    rt = dict(concurrency=16, num_actors=2, batch_size=4, backoff_base_s=0.05, backoff_max_s=0.3,
              max_attempts=4, progress=False, num_cpus_per_actor=0.5)
    rt.update(runtime)
    return A.AnnotationSpec(
        task="svamp", level=level,
        teacher=dict(model="openai/mock-teacher", api_base=server.base_url, api_key_env=KEY_ENV, timeout_s=timeout_s),
        questions=dict(source="parquet", path=str(qpath), limit=n),
        runtime=rt,
    )


def ok_counts(entries: list[dict]) -> Counter:
    return Counter(e["key"] for e in entries if e["kind"] == "ok")


def _kill_driver_when(script: str, ready, timeout: float, never: str, poll_s: float) -> float:
    """Run ``script`` as a driver process of its own and SIGKILL it as soon as ``ready()`` holds
    (failing with ``never`` after ``timeout`` s, or with its output if it ends first); the time of
    the kill."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, never
            time.sleep(poll_s)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return killed_at


def test_kill_half_way_then_rerun_sends_no_completed_request_twice(ray_cluster, tmp_path):
    n = 80
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.4, answers=gold) as server:  # about 10 rows/s
        spec = spec_for(server, qpath, n, concurrency=4, ray_address=ray_cluster.address_info["address"])
        out = tmp_path / "cell"
        (tmp_path / "spec.json").write_text(spec.model_dump_json())
        script = textwrap.dedent(f"""
            import json, sys
            from raydistill import annotate as A
            spec = A.AnnotationSpec.model_validate_json(open({str(tmp_path / 'spec.json')!r}).read())
            A.annotate(spec, {str(out)!r})
            print("finished")
        """)
        t_kill = _kill_driver_when(script, lambda: server.stats()["ok"] >= n // 2 + 4, 150,
                                   "the first run never reached half way", poll_s=0.05)
        # Let the dead job's actors go quiet before the rerun.
        last, quiet_since = -1, time.time()
        while time.time() - quiet_since < 1.5:
            cur = server.stats()["requests"]
            if cur != last:
                last, quiet_since = cur, time.time()
            time.sleep(0.1)
        first = server.log_entries()
        # Replies sent well before the kill had time to reach the cache; the last ones may not have.
        done_before_kill = {e["key"] for e in first if e["kind"] == "ok" and e["t_done"] < t_kill - 2.0}
        assert n // 5 <= len(done_before_kill) < n
        assert not (out / "annotations.parquet").exists()

        t_rerun = time.time()
        faster = spec.runtime.model_copy(update={"concurrency": 16})  # not part of any request's key
        result = A.annotate(spec.model_copy(update={"runtime": faster}), out)
        log = server.log_entries()
        rerun = [e for e in log if e["t_recv"] >= t_rerun]

    # Nothing that had completed was sent again, and only the unfinished rest went out.
    assert not done_before_kill & {e["key"] for e in rerun}
    counts = ok_counts(log)
    assert all(counts[k] == 1 for k in done_before_kill)
    # Sent twice: only what was in flight when the job's actors died (at most the concurrency).
    assert len([k for k, c in counts.items() if c > 1]) <= spec.runtime.concurrency
    assert len(rerun) <= n - len(done_before_kill)
    assert result.cache_hits >= len(done_before_kill)
    assert result.cache_hits + result.requests_sent == n
    # Every row exactly once, all answered and verified.
    table = pq.read_table(result.annotations_path)
    assert table.schema.equals(ANNOTATION_SCHEMA)
    assert table.num_rows == n and len(set(table.column("question_id").to_pylist())) == n
    assert table.column("error").null_count == n
    assert result.teacher_accuracy == 1.0 and result.failed == 0
    assert len(counts) == n  # every question reached the teacher once in total, across both runs


def test_injected_failures_are_retried_or_recorded_and_cache_hits_are_counted(ray_cluster, tmp_path):
    n = 80
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.02, answers=gold, fail_rate=0.2, permanent_fail_rate=0.1,
                       fail_kinds="429,500,timeout", timeout_sleep=1.5, wrong_rate=0.25,
                       expect_key_sha256=__import__("hashlib").sha256(SENTINEL.encode()).hexdigest()) as server:
        spec = spec_for(server, qpath, n, max_attempts=3, timeout_s=0.5, num_actors=1)
        out = tmp_path / "cell"
        r1 = A.annotate(spec, out)
        log1 = server.log_entries()
        rows = pq.read_table(r1.annotations_path).to_pylist()
        examples = pq.read_table(r1.examples_path)
        r2 = A.annotate(spec, out)  # same hash: outputs reused, nothing runs
        assert r2.reused and server.log_entries() == log1
        t_rerun = time.time()
        r3 = A.annotate(spec, out, overwrite=True)
        log3 = [e for e in server.log_entries() if e["t_recv"] >= t_rerun]

    # The key came from the environment and reached the server on every request.
    assert log1 and all(e["auth"] is True for e in log1)
    # Every row is present once: complete, or failed with its reason.
    assert len(rows) == n and len({r["question_id"] for r in rows}) == n
    failed = [r for r in rows if r["error"] is not None]
    ok = [r for r in rows if r["error"] is None]
    assert failed and ok and r1.failed == len(failed) and r1.succeeded == len(ok)
    for r in failed:
        assert r["response"] is None and "after" in r["error"] and "attempt" in r["error"]
        assert any(s in r["error"] for s in ("429", "500", "Timeout", "timeout")), r["error"]
    for r in ok:
        assert r["response"].endswith(f"The answer is {r['extracted']}")
        assert r["tokens_in"] > 0 and r["tokens_out"] > 0 and r["cost_usd"] == 0.0
    assert sum(r1.errors.values()) == len(failed)
    # Transient failures were retried; the server saw more attempts than rows.
    kinds = Counter(e["kind"] for e in log1)
    assert kinds["ok"] == len(ok) and r1.requests_sent == len(log1) and r1.retries == len(log1) - n
    assert {"429", "500"} <= set(kinds)
    # A retryable failure gives up only after max_attempts; some rows succeeded on a retry.
    tries = Counter(e["question"] for e in log1)
    for r in failed:
        assert tries[r["question"]] == spec.runtime.max_attempts, r["error"]
    assert any(tries[r["question"]] > 1 for r in ok)
    # Verification: wrong answers are kept by keep_all, marked incorrect.
    wrong = [r for r in ok if not r["correct"]]
    assert wrong and r1.teacher_accuracy == pytest.approx(1 - len(wrong) / len(ok))
    assert examples.schema.equals(EXAMPLE_SCHEMA) and examples.num_rows == len(ok) == r1.kept
    # Rerun: successes come from the cache, only the failed rows are tried again.
    assert r3.cache_hits == len(ok) and r3.rows == n and r3.requests_sent == len(log3)
    assert {e["question"] for e in log3} == {r["question"] for r in failed}
    assert all(v == 1 for v in ok_counts(server.log_entries()).values())
    # The key appears in no file the stage wrote (Parquet, cache, summary).
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("server-")]
    assert any(p.suffix == ".jsonl" for p in written) and any(p.suffix == ".parquet" for p in written)
    for p in written:
        assert SENTINEL.encode() not in p.read_bytes(), p
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"]["teacher"]["api_key_env"] == KEY_ENV


def test_show_gold_sends_each_question_with_its_gold_answer(ray_cluster, tmp_path):
    """The opt-in gold hint reaches the teacher: every request's last user turn is the question
    followed by its gold answer, and the one-shot turn shows the exemplar's own answer. The
    cell hash differs from the plain cell's. Replies the teacher cut at max_tokens keep their
    finish_reason and are counted."""
    n = 8
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.0, cut_rate=0.5) as server:
        plain = spec_for(server, qpath, n)
        hinted = plain.model_copy(update={"show_gold": True})
        result = A.annotate(hinted, tmp_path / "cell")
        sent = [e["question"] for e in server.log_entries() if e["kind"] == "ok"]
    assert hinted.cell_hash() != plain.cell_hash() and result.cell_name.endswith("-gold")
    assert len(sent) == n
    for question, answer in gold.items():
        (turn,) = [s for s in sent if s.startswith(question)]
        assert f"The correct final answer is {answer}." in turn
    messages = prompts.build_messages("svamp", 3, "cot", "Q?", gold="7")
    exemplar = prompts.exemplar("svamp")
    assert f"The correct final answer is {exemplar.answer}." in messages[1]["content"]
    rows = pq.read_table(result.annotations_path).to_pylist()
    cut = sum(r["finish_reason"] == "length" for r in rows)
    assert 0 < cut < n and {r["finish_reason"] for r in rows} == {"stop", "length"}
    assert result.truncated == cut and result.truncated_share == pytest.approx(cut / result.succeeded)
    assert all(r["correct"] is False for r in rows if r["finish_reason"] == "length")  # the answer was cut off


def test_requests_per_minute_limit_holds_at_the_server(ray_cluster, tmp_path):
    n, rpm = 30, 600  # 10 requests/s, bucket of 1 s = 10
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.0, answers=gold) as server:
        spec = spec_for(server, qpath, n, concurrency=32)
        spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"requests_per_minute": rpm})})
        r = A.annotate(spec, tmp_path / "cell")
        ts = sorted(e["t_recv"] for e in server.log_entries())
    assert r.failed == 0 and len(ts) == n
    rate, burst = rpm / 60, rpm / 60 * 1.0
    for i, t0 in enumerate(ts):  # at most burst + rate * W starts in any window of W = 1 s
        in_window = sum(1 for t in ts[i:] if t < t0 + 1.0)
        assert in_window <= burst + rate * 1.0 + 1, (i, in_window)
    assert ts[-1] - ts[0] >= (n - burst) / rate * 0.9


def test_cli_grid_padding_and_hybrid_cells(ray_cluster, tmp_path, capsys):
    n = 24
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.0, answers=gold, wrong_rate=0.5) as server:
        cfg = tmp_path / "annotate.yaml"
        cfg.write_text(textwrap.dedent(f"""
            output_dir: {tmp_path / 'out'}
            teacher: {{model: openai/mock-teacher, name: mock, api_base: "{server.base_url}", api_key_env: {KEY_ENV}}}
            questions: {{source: parquet, path: "{qpath}"}}
            policy: keep_correct
            runtime: {{concurrency: 16, num_actors: 1, batch_size: 4, num_cpus_per_actor: 0.5, progress: false}}
            grid: {{tasks: [svamp], levels: [1, 5]}}
            cells:
              - {{task: svamp, level: 1, pad: {{to_level: 5}}}}
              - {{task: svamp, hybrid: {{by: answer_only, easy_level: 2, hard_level: 6}}}}
              - {{task: svamp, hybrid: {{by: question_length, easy_level: 1, hard_level: 4}}}}
        """))
        assert A.main(["--config", str(cfg), "--json", str(tmp_path / "run.json")]) == 0
        log = server.log_entries()
        assert A.main(["--config", str(cfg)]) == 0  # all cells exist: reused, nothing sent
        assert server.log_entries() == log
    printed = capsys.readouterr().out
    assert "| svamp-mock-cot-L1-pad5 |" in printed and "(reused)" in printed
    run = json.loads((tmp_path / "run.json").read_text())
    cells = {c["cell_name"]: c for c in run["cells"]}
    assert len(cells) == 5 and all(c["rows"] == n and c["failed"] == 0 for c in cells.values())
    # Requests are shared between cells: L1 and L5 serve the padded cell, L1/L4 the hybrid one.
    assert len(ok_counts(log)) == len(log) == run["totals"]["api_calls"] + run["totals"].get("probe_api_calls", 0)
    out = tmp_path / "out"
    l1 = {r["question_id"]: r for r in pq.read_table(out / "svamp-mock-cot-L1" / "annotations.parquet").to_pylist()}
    l5 = {r["question_id"]: r for r in pq.read_table(out / "svamp-mock-cot-L5" / "annotations.parquet").to_pylist()}
    pad = pq.read_table(out / "svamp-mock-cot-L1-pad5" / "annotations.parquet").to_pylist()
    for r in pad:
        assert r["format"] == "cot+pad5" and r["level"] == 1
        assert len(r["response"].split()) == max(len(l5[r["question_id"]]["response"].split()),
                                                 len(l1[r["question_id"]]["response"].split()))
        assert [w for w in r["response"].split() if w != "..."] == l1[r["question_id"]]["response"].split()
    assert cells["svamp-mock-cot-L5"]["mean_rationale_words"] > cells["svamp-mock-cot-L1"]["mean_rationale_words"]
    # Hybrid by the teacher's answer-only correctness: wrong probes get the hard level.
    hyb = out / "svamp-mock-cot-hybrid-answer_only-L2L6"
    probe = {r["question_id"]: r for r in pq.read_table(hyb / "probe.parquet").to_pylist()}
    rows = pq.read_table(hyb / "annotations.parquet").to_pylist()
    assert {r["level"] for r in rows} == {2, 6}
    for r in rows:
        assert r["level"] == (2 if probe[r["question_id"]]["correct"] else 6)
    qlen = pq.read_table(out / "svamp-mock-cot-hybrid-question_length-L1L4" / "annotations.parquet").to_pylist()
    assert {r["level"] for r in qlen} == {1, 4}
    # keep_correct: examples hold only verified rows.
    ex = pq.read_table(out / "svamp-mock-cot-L5" / "examples.parquet")
    assert ex.num_rows == sum(1 for r in l5.values() if r["correct"]) == cells["svamp-mock-cot-L5"]["kept"] < n


def test_cli_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output_dir: o\nteacher: {model: openai/x, api_key: sk-abc}\ngrid: {tasks: [svamp]}\n")
    assert A.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teacher" in err and "api_key_env" in err and "sk-abc" not in err


def test_two_runs_on_one_output_dir_send_each_request_once_and_write_whole_files(ray_cluster, tmp_path):
    """Two `raydistill annotate` runs of the same cells, started together (two sweeps sharing an
    output dir): the second waits on the cells' locks and reuses what the first wrote."""
    n = 24
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.2, answers=gold) as server:
        cfg = tmp_path / "annotate.yaml"
        cfg.write_text(textwrap.dedent(f"""
            output_dir: {tmp_path / 'out'}
            teacher: {{model: openai/mock-teacher, name: mock, api_base: "{server.base_url}", api_key_env: {KEY_ENV}}}
            questions: {{source: parquet, path: "{qpath}"}}
            runtime: {{concurrency: 4, num_actors: 1, batch_size: 4, num_cpus_per_actor: 0.25, progress: false,
                       ray_address: "{ray_cluster.address_info['address']}"}}
            grid: {{tasks: [svamp], levels: [1, 3]}}
        """))
        cli = [str(Path(sys.executable).parent / "raydistill"), "annotate", "--config", str(cfg)]
        runs = [subprocess.Popen(cli, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
        log = server.log_entries()

    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert any("another run is annotating this cell" in o for o in outputs), outputs
    counts = ok_counts(log)
    assert len(counts) == 2 * n and set(counts.values()) == {1}, "a request was sent by both runs"
    for level in (1, 3):
        folder = tmp_path / "out" / f"svamp-mock-cot-L{level}"
        table = pq.read_table(folder / "annotations.parquet")
        assert table.schema.equals(ANNOTATION_SCHEMA) and table.num_rows == n
        assert table.column("error").null_count == n
        assert pq.read_table(folder / "examples.parquet").schema.equals(EXAMPLE_SCHEMA)
        assert json.loads((folder / "summary.json").read_text())["result"]["rows"] == n
        assert not [p.name for p in folder.rglob("*.tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("kind", ["hang", "stall"])
def test_a_teacher_that_never_answers_fails_its_rows_and_retry_failed_sends_only_them(ray_cluster, tmp_path, kind):
    """`hang`: the connection is accepted and nothing comes back; `stall`: headers and half a body,
    then nothing. Each attempt ends at the client's timeout, the row fails with the reason after
    max_attempts, the run finishes; a rerun with retry_failed sends exactly those rows."""
    n = 8
    qpath, gold = make_questions(tmp_path, n)
    stuck = list(gold)[:2]
    with ServerProcess(tmp_path / "srv", answers=gold, kinds_by_question={q: kind for q in stuck}) as server:
        spec = spec_for(server, qpath, n, timeout_s=1.0, max_attempts=2,
                        ray_address=ray_cluster.address_info["address"])
        first = A.annotate(spec, tmp_path / "cell")
        sent = server.log_entries()
    rows = {r["question"]: r for r in pq.read_table(first.annotations_path).to_pylist()}
    assert first.rows == n and first.failed == len(stuck) and first.succeeded == n - len(stuck)
    for q in stuck:
        assert "timeout" in rows[q]["error"] and "after 2 attempt" in rows[q]["error"], rows[q]["error"]
        attempts = sorted(e["t_recv"] for e in sent if e["question"] == q)
        assert len(attempts) == 2 and attempts[1] - attempts[0] >= spec.teacher.timeout_s
    assert A.annotate(spec, tmp_path / "cell").reused  # without retry_failed, the cell is final

    with ServerProcess(tmp_path / "srv2", answers=gold) as healthy:
        moved = spec.teacher.model_copy(update={"api_base": healthy.base_url})
        second = A.annotate(spec.model_copy(update={"teacher": moved}), tmp_path / "cell", retry_failed=True)
        resent = healthy.log_entries()
    assert sorted(e["question"] for e in resent) == sorted(stuck)
    assert second.failed == 0 and second.rows == n and second.cache_hits == n - len(stuck)
    assert pq.read_table(second.annotations_path).column("error").null_count == n



def test_a_cache_write_error_in_an_actor_reaches_the_driver_as_its_own_line(ray_cluster):
    import ray

    class FullDiskCaller:  # fails as TeacherCaller does when its cache shard cannot be appended
        def __call__(self, batch):
            raise A.CacheWriteError("request cache: could not append to /c/shard.jsonl (No space left on device)")

    ds = ray.data.range(4).map_batches(FullDiskCaller, batch_size=2, compute=ray.data.ActorPoolStrategy(size=1))
    with pytest.raises(Exception) as raised:
        for _ in ds.iter_batches(batch_size=None):
            pass
    assert not isinstance(raised.value, A.CacheWriteError)  # Ray Data keeps only the remote traceback's text
    found = A.cache_write_error_in(raised.value)
    assert isinstance(found, A.CacheWriteError)
    assert str(found) == "request cache: could not append to /c/shard.jsonl (No space left on device)"


@pytest.mark.parametrize("kind", ["429", "timeout"])
def test_transient_failures_are_retried_end_to_end(ray_cluster, tmp_path, kind):
    """A 429 with `Retry-After: 1` is retried no sooner than 1 s later (measured at the server,
    with our own backoff capped far below it); a reply slower than `timeout_s` is abandoned and
    retried. A row fails only after max_attempts, and the counts match the server's log."""
    n = 24
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", answers=gold, fail_rate=0.4, fail_kinds=kind, retry_after=1,
                       timeout_sleep=3) as server:
        spec = spec_for(server, qpath, n, max_attempts=4, timeout_s=0.5, backoff_base_s=0.05, backoff_max_s=0.2,
                        ray_address=ray_cluster.address_info["address"])
        result = A.annotate(spec, tmp_path / "cell")
        log = server.log_entries()
    by_question: dict[str, list[dict]] = {}
    for e in sorted(log, key=lambda e: e["attempt"]):
        by_question.setdefault(e["question"], []).append(e)
    assert len(by_question) == n
    retried = [sent for sent in by_question.values() if len(sent) > 1]
    assert len(retried) >= n // 4
    for sent in by_question.values():
        assert [e["attempt"] for e in sent] == list(range(len(sent)))
        assert all(e["kind"] == kind for e in sent[:-1]), "a request was sent again after it succeeded"
        assert sent[-1]["kind"] == "ok" or len(sent) == spec.runtime.max_attempts
        for before, after in zip(sent, sent[1:]):
            if kind == "429":
                assert after["t_recv"] - before["t_done"] >= 1.0, "Retry-After was not honoured"
            else:
                assert after["t_recv"] - before["t_recv"] >= spec.teacher.timeout_s
    assert result.failed == sum(1 for sent in by_question.values() if sent[-1]["kind"] != "ok")
    assert result.succeeded == n - result.failed and result.retries == len(log) - n


def test_cost_is_attributed_once_per_run_and_every_response_is_priced(ray_cluster, tmp_path):
    """Priced teacher; cells that share requests (L1 and its copy padded to L5) and a hybrid cell
    with answer-only probes. Rows carry the price of every response they use, cells sum their
    rows, and what the run spent counts each request once: the cells' spend adds up to it.
    `raydistill plan` before the run: the requests it plans are the ones the run sends, its input
    tokens are the server's usage (the server counts OpenAI's way in cl100k_base), its output
    tokens per level come from the released rationales, its dollars are the run's cost at the run's
    tokens."""
    from raydistill import plan as P
    from raydistill.plan.teacher import plan_requests, released_output_tokens, teacher_prices

    n = 12
    price_in, price_out = 1e-6, 3e-6
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", answers=gold, wrong_rate=0.5, usage="tiktoken") as server:
        cfg = tmp_path / "annotate.yaml"
        cfg.write_text(textwrap.dedent(f"""
            output_dir: {tmp_path / 'out'}
            teacher: {{model: openai/mock-teacher, name: mock, api_base: "{server.base_url}", api_key_env: {KEY_ENV},
                       input_cost_per_token: {price_in}, output_cost_per_token: {price_out}}}
            questions: {{source: parquet, path: "{qpath}"}}
            runtime: {{concurrency: 16, num_actors: 1, batch_size: 4, num_cpus_per_actor: 0.5, progress: false,
                       ray_address: "{ray_cluster.address_info['address']}"}}
            cells:
              - {{task: svamp, level: 1, pad: {{to_level: 5}}}}
              - {{task: svamp, level: 1}}
              - {{task: svamp, hybrid: {{by: answer_only, easy_level: 1, hard_level: 5}}}}
        """))
        assert P.main(["--config", str(cfg)]) == 0
        planned = {k: v for c in plan_requests([(s.cell_name(), s, d) for s, d in A.load_config(cfg).expand()])
                   for k, v in c.sent.items()}
        assert A.main(["--config", str(cfg), "--json", str(tmp_path / "run.json")]) == 0
        sent = server.log_entries()
        assert A.main(["--config", str(cfg), "--overwrite", "--json", str(tmp_path / "again.json")]) == 0
        assert server.log_entries() == sent  # everything came from the cache

    out = tmp_path / "out"
    records = A.RequestCache(out / "request-cache").load()
    assert len(records) == len(sent)  # one record per request the server answered
    price = {k: r["tokens_in"] * price_in + r["tokens_out"] * price_out for k, r in records.items()}
    assert all(r["cost_usd"] == pytest.approx(price[k]) and price[k] > 0 for k, r in records.items())

    # The plan: every request it planned was sent and nothing else, each with the input tokens the
    # server reported; output tokens within the stated error; dollars the run's cost at its tokens.
    plan = json.loads((out / "plan.json").read_text())["teacher"]["totals"]
    assert plan["requests"] == len(planned) == len(records) and set(planned) == set(records)
    assert all(records[k]["tokens_in"] == tokens for k, tokens in planned.items())
    assert plan["tokens_in"] == sum(r["tokens_in"] for r in records.values())
    # Output tokens: 12 replies each at L1 and L5 and 12 answer-only probes, each estimated from the
    # released rationales of that level. The L1 replies are within the stated error. The server's
    # L5 replies copy the 103-word L5 exemplar and its probes echo 12 words of the question, so it
    # writes longer than every released teacher there and the run's total exceeds the estimate:
    # the error covers the released teachers' spread, not a teacher unlike all of them.
    estimate = {lv: released_output_tokens("svamp", lv, "cot", "openai/mock-teacher", 1024) for lv in (1, 5, None)}
    assert plan["tokens_out"] == pytest.approx(n * sum(e.mean for e in estimate.values()), abs=1)
    l1_out = sum(r["tokens_out"] for r in pq.read_table(out / "svamp-mock-cot-L1" / "annotations.parquet").to_pylist())
    assert abs(l1_out - n * estimate[1].mean) <= n * estimate[1].mean * estimate[1].rel_error
    tokens_out = sum(r["tokens_out"] for r in records.values())
    teacher = A.load_config(cfg).teacher
    at_run_tokens = teacher_prices(teacher).usd(plan["tokens_in"], tokens_out)
    assert at_run_tokens == pytest.approx(sum(r["cost_usd"] for r in records.values()))
    assert plan["usd_sync"] == pytest.approx(teacher_prices(teacher).usd(plan["tokens_in"], plan["tokens_out"]), abs=1e-4)

    def rows(cell: str, name: str = "annotations.parquet") -> dict[str, dict]:
        return {r["question_id"]: r for r in pq.read_table(out / cell / name).to_pylist()}

    def own(row: dict) -> float:
        return row["tokens_in"] * price_in + row["tokens_out"] * price_out

    l1, pad = rows("svamp-mock-cot-L1"), rows("svamp-mock-cot-L1-pad5")
    hybrid = rows("svamp-mock-cot-hybrid-answer_only-L1L5")
    probe = rows("svamp-mock-cot-hybrid-answer_only-L1L5", "probe.parquet")
    level5 = {r["question"]: r for r in hybrid.values() if r["level"] == 5}
    for qid, row in l1.items():
        assert row["cost_usd"] == pytest.approx(own(row))
        # The padded row used its L1 rationale and the L5 reply whose length it took.
        l5_cost = pad[qid]["cost_usd"] - row["cost_usd"]
        assert l5_cost > 0
        if row["question"] in level5:
            assert l5_cost == pytest.approx(own(level5[row["question"]]))
        assert hybrid[qid]["cost_usd"] == pytest.approx(own(hybrid[qid]) + probe[qid]["cost_usd"])
        assert probe[qid]["cost_usd"] == pytest.approx(own(probe[qid]))

    for name in ("run.json", "again.json"):
        run = json.loads((tmp_path / name).read_text())
        for cell in run["cells"]:
            assert cell["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows(cell["cell_name"]).values()))
        spent = A.spent_usd(run["totals"])
        assert sum(c["new_cost_usd"] for c in run["cells"]) == pytest.approx(spent)
        assert spent == pytest.approx(sum(price.values()) if name == "run.json" else 0.0)


def test_a_killed_teacher_actor_costs_at_most_its_requests_in_flight(ray_cluster, tmp_path):
    """SIGKILL one of two TeacherCaller actors half way. Ray Data restarts it and retries its
    batches; the run (or a rerun, if it fails) completes every row, and the only requests sent
    twice are those the killed actor had in flight (counted from the server's log)."""
    import threading

    import psutil

    n = 80
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.4, answers=gold) as server:
        spec = spec_for(server, qpath, n, concurrency=4, num_actors=2,
                        ray_address=ray_cluster.address_info["address"])
        outcome: list = []
        run = threading.Thread(target=lambda: outcome.append(_annotate_or_error(spec, tmp_path / "cell")))
        run.start()
        deadline = time.time() + 150
        while server.stats()["ok"] < n // 2:
            assert run.is_alive() and time.time() < deadline, outcome
            time.sleep(0.05)
        actors = [p for p in psutil.process_iter(["cmdline"]) if "MapBatches(TeacherCaller)" in " ".join(p.info["cmdline"] or [])]
        assert len(actors) == 2, [p.info["cmdline"] for p in actors]
        t_kill = time.time()
        actors[0].kill()
        run.join(300)
        assert not run.is_alive()
        result = outcome[0]
        if isinstance(result, BaseException):  # the run failed with the actor: rerun
            result = A.annotate(spec, tmp_path / "cell")
        log = server.log_entries()

    in_flight = [e for e in log if e["t_recv"] <= t_kill < e["t_done"]]  # both actors'
    per_actor = spec.runtime.concurrency // spec.runtime.num_actors  # the most one actor has in flight
    twice = [k for k, c in ok_counts(log).items() if c > 1]
    assert len(twice) <= min(per_actor, len(in_flight)), (len(twice), len(in_flight))
    table = pq.read_table(result.annotations_path)
    assert table.num_rows == n and table.column("error").null_count == n
    assert len(ok_counts(log)) == n


def _annotate_or_error(spec, out):
    try:
        return A.annotate(spec, out)
    except BaseException as err:  # noqa: BLE001 - the test looks at it
        return err


def test_k_samples_per_question_with_each_policy(ray_cluster, tmp_path):
    """Three samples per question, each its own request with its own seed, and every policy on
    them: the server answers each (question, seed) right or wrong by a rule the test knows, so the
    rows each policy keeps are computed here by hand. Cells with the same samples share their
    requests, sample 0 is the one-sample cell's request, and a rerun sends nothing."""
    from openai_server import wrong_by_seed

    n, k, seed, rate = 10, 3, 11, 0.5
    qpath, gold = make_questions(tmp_path, n)
    policies = ["keep_all", "keep_correct", "keep_first_correct", "keep_majority"]
    with ServerProcess(tmp_path / "srv", answers=gold, wrong_by_seed=rate) as server:
        cfg = tmp_path / "annotate.yaml"
        cells = "".join(f"\n  - {{task: svamp, level: 3, policy: {p}}}" for p in policies)
        cfg.write_text(textwrap.dedent(f"""
            output_dir: {tmp_path / 'out'}
            teacher: {{model: openai/mock-teacher, name: mock, api_base: "{server.base_url}", api_key_env: {KEY_ENV},
                       temperature: 0.7, seed: {seed}}}
            questions: {{source: parquet, path: "{qpath}"}}
            samples: {k}
            runtime: {{concurrency: 16, num_actors: 1, batch_size: 4, num_cpus_per_actor: 0.5, progress: false,
                       ray_address: "{ray_cluster.address_info['address']}"}}
            cells:
              - {{task: svamp, level: 3, policy: keep_majority, max_per_question: 1}}
              - {{task: svamp, level: 3, samples: 1}}
        """) + cells + "\n")
        assert A.main(["--config", str(cfg)]) == 0
        stats = server.stats()
        assert stats["requests"] == stats["ok"] == stats["distinct_ok"] == n * k  # shared by the cells
        sent = server.log_entries()
        assert A.main(["--config", str(cfg)]) == 0  # every cell reused
        assert A.main(["--config", str(cfg), "--overwrite"]) == 0  # every request from the cache
        assert server.log_entries() == sent

    # The server's replies: sample i of a question carries seed + i; wrong_by_seed says which are wrong.
    right: dict[str, list[bool]] = {}
    for question in gold:
        sent_text = prompts.build_messages("svamp", 3, "cot", question)[-1]["content"]
        right[question] = [not wrong_by_seed(sent_text, seed + i, rate) for i in range(k)]
    assert {sum(r) for r in right.values()} == {0, 1, 2, 3}  # the policies differ on these questions

    def by_hand(policy: str, r: list[bool]) -> list[int]:
        majority = sum(r) * 2 > len(r)  # two answers only: the gold and one wrong one
        return {"keep_all": [0, 1, 2], "keep_correct": [i for i in range(k) if r[i]],
                "keep_first_correct": [i for i in range(k) if r[i]][:1],
                "keep_majority": [i for i in range(k) if r[i] == majority]}[policy]

    out = tmp_path / "out"
    k1 = pq.read_table(out / "svamp-mock-cot-L3" / "annotations.parquet").to_pylist()
    for policy, cap in [(p, None) for p in policies] + [("keep_majority", 1)]:
        cell = out / (f"svamp-mock-cot-L3-k3-{policy}" + (f"-max{cap}" if cap else ""))
        rows = pq.read_table(cell / "annotations.parquet").to_pylist()
        assert [(r["question"], r["sample"]) for r in rows] == [(q, i) for q in gold for i in range(k)]
        assert [r["correct"] for r in rows] == [ok for q in gold for ok in right[q]]
        assert [r["response"] for r in rows if r["sample"] == 0] == [r["response"] for r in k1]
        expected = {q: by_hand(policy, right[q])[:cap] for q in gold}
        examples = pq.read_table(cell / "examples.parquet")
        assert examples.schema.equals(EXAMPLE_SCHEMA)
        rationale = {(r["question"], r["sample"]): r["response"].strip() for r in rows}
        assert examples.column("rationale").to_pylist() == [rationale[(q, i)] for q in gold for i in expected[q]]
        result = json.loads((cell / "summary.json").read_text())["result"]
        assert result["samples"] == k and result["questions"] == n and result["rows"] == n * k
        assert result["kept"] == sum(map(len, expected.values()))
        assert result["questions_kept"] == sum(bool(v) for v in expected.values())
        assert result["policies_would_keep"] == {p: sum(bool(by_hand(p, r)) for r in right.values())
                                                 for p in policies}
        assert result["teacher_pass_at_k"] == pytest.approx(sum(any(r) for r in right.values()) / n)
    single = json.loads((out / "svamp-mock-cot-L3" / "summary.json").read_text())["result"]
    assert single["samples"] == 1 and single["rows"] == n
    assert single["teacher_pass_at_k"] == pytest.approx(sum(r[0] for r in right.values()) / n)


def _cap_config(tmp_path: Path, server: ServerProcess, qpath: Path, prices: bool = True) -> Path:
    cfg = tmp_path / "annotate.yaml"
    priced = ", input_cost_per_token: 1.0e-6, output_cost_per_token: 2.0e-6" if prices else ""
    cfg.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / 'out'}
        teacher: {{model: openai/mock-teacher, name: mock, api_base: "{server.base_url}", api_key_env: {KEY_ENV},
                   max_tokens: 200{priced}}}
        questions: {{source: parquet, path: "{qpath}"}}
        runtime: {{concurrency: 4, num_actors: 1, batch_size: 4, num_cpus_per_actor: 0.5, progress: false}}
        cells:
          - {{task: svamp, level: 3}}
    """))
    return cfg


def test_spending_cap_stops_mid_cell_and_a_rerun_with_a_higher_cap_sends_only_the_rest(ray_cluster, tmp_path,
                                                                                      capsys):
    """A priced teacher and a cap that covers about half the cell: the run stops with one line,
    nothing reaches the server after the cap closed except what was in flight, the answered rows
    are written (summary.json: complete false, rows_left) and the cache holds them; what was sent
    costs no more than the cap. A rerun with a higher cap sends exactly the rows left."""
    n, cap = 24, 0.005
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", latency=0.05, answers=gold) as server:
        cfg = _cap_config(tmp_path, server, qpath)
        rc = A.main(["--config", str(cfg), "--max-spend", str(cap), "--json", str(tmp_path / "run.json")])
        first = server.log_entries()
        err = capsys.readouterr().err.strip().splitlines()
        cached = A.RequestCache(tmp_path / "out" / "request-cache").load()
        cell = tmp_path / "out" / "svamp-mock-cot-L3"
        summary = json.loads((cell / "summary.json").read_text())
        table = pq.read_table(cell / "annotations.parquet")
        t_rerun = time.time()
        assert A.main(["--config", str(cfg), "--max-spend", "1"]) == 0
        rerun = [e for e in server.log_entries() if e["t_recv"] >= t_rerun]

    assert rc == 3
    run = json.loads((tmp_path / "run.json").read_text())
    answered = {e["key"] for e in first if e["kind"] == "ok"}
    assert 0 < len(answered) < n and len(first) == len(answered)  # stopped mid-cell, nothing sent twice
    line = err[-1]
    assert line.startswith("stopped at the spending cap: spent $") and f"of ${cap:.4f}" in line
    assert f"{n - len(answered)} row(s) left in 1 cell(s)" in line
    # What the server answered is in the cache, and cost no more than the cap.
    spent = sum(r["tokens_in"] * 1e-6 + r["tokens_out"] * 2e-6 for r in cached.values())
    assert len(cached) == len(answered)  # (the server's keys are its own hashes)
    assert 0 < spent <= cap and f"spent ${spent:.4f}" in line
    # After the cap closed, only the requests then in flight reached the server.
    closed_at, in_flight = run["totals"]["cap_closed_at"], run["totals"]["cap_in_flight_at_close"]
    assert len([e for e in first if e["t_recv"] >= closed_at]) <= in_flight <= 4
    # The answered rows are written; the cell is not complete, so the next run annotates it.
    assert summary["complete"] is False and summary["result"]["rows_left"] == n - len(answered)
    assert table.num_rows == len(answered) and table.column("error").null_count == len(answered)
    # The rerun with a higher cap sends exactly the rows left, and completes the cell.
    assert len(rerun) == n - len(answered) and not {e["key"] for e in rerun} & answered
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["complete"] is True and summary["result"]["rows"] == n and summary["result"]["rows_left"] == 0
    assert summary["result"]["cache_hits"] == len(answered)


def test_a_cap_on_an_unpriced_teacher_is_refused_before_any_request(tmp_path, capsys):
    qpath, gold = make_questions(tmp_path, 4)
    with ServerProcess(tmp_path / "srv", answers=gold) as server:
        cfg = _cap_config(tmp_path, server, qpath, prices=False)
        assert A.main(["--config", str(cfg), "--max-spend", "5"]) == 2
        assert server.stats()["requests"] == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{cfg}: --max-spend: teacher openai/mock-teacher has no price")
    assert "input_cost_per_token" in err[0]
    assert not (tmp_path / "out" / "svamp-mock-cot-L3" / "summary.json").exists()


PRICED = dict(input_cost_per_token=1e-6, output_cost_per_token=2e-6)


def _batch_spec(server: ServerProcess, qpath: Path, n: int, **runtime) -> A.AnnotationSpec:
    spec = spec_for(server, qpath, n, **runtime)
    return spec.model_copy(update={"teacher": spec.teacher.model_copy(update=PRICED)})


def _rows(path) -> list[dict]:
    keep = ("question_id", "response", "extracted", "correct", "tokens_in", "tokens_out", "finish_reason", "error")
    return [{k: r[k] for k in keep} for r in pq.read_table(path).to_pylist()]


def test_batch_mode_writes_the_rows_synchronous_mode_writes_at_the_batch_price(ray_cluster, tmp_path, caplog):
    """A whole cell through the batch API of the local server (files, batches, status changes,
    output files), cut into batches of 5: the rows equal those of a synchronous run against the
    same server, each priced at half the declared price; batches.json lists every batch; the
    replies are in the request cache under the synchronous keys, so a synchronous run of the cell
    afterwards sends nothing."""
    import logging

    n = 12
    qpath, gold = make_questions(tmp_path, n)
    caplog.set_level(logging.INFO, logger="raydistill.annotate.batch")
    with ServerProcess(tmp_path / "srv", answers=gold, batch_polls=1) as server:
        spec = _batch_spec(server, qpath, n)
        run = A.annotate_cells([(spec, tmp_path / "batch")], mode="batch",
                               batch=A.BatchSpec(poll_s=0.05, max_requests=5))
        sent = server.log_entries()
        stats = server.batch_stats()
        synced = A.annotate(spec, tmp_path / "sync")
        t_sync = time.time()
        again = A.annotate(spec, tmp_path / "batch", overwrite=True)  # now synchronous: all from the cache
        after = [e for e in server.log_entries() if e["t_recv"] >= t_sync]

    (cell,) = run.cells
    assert stats["batches_created"] == 3 and set(stats["status"].values()) == {"completed"}
    assert len(sent) == n and all(e.get("batch") for e in sent) and len(ok_counts(sent)) == n
    assert cell.batch_rows == n and cell.batch_resent == 0 and cell.failed == 0
    assert run.totals["batches_created"] == 3 and run.totals["api_calls"] == n
    assert _rows(cell.annotations_path) == _rows(synced.annotations_path)
    rows = pq.read_table(cell.annotations_path).to_pylist()
    for r in rows:
        assert r["cost_usd"] > 0 and r["cost_usd"] == pytest.approx(0.5 * (r["tokens_in"] * 1e-6 + r["tokens_out"] * 2e-6))
    ledger = json.loads((tmp_path / "batch" / "batches.json").read_text())["batches"]
    assert [b["requests"] for b in ledger] == [5, 5, 2] and all(b["closed"] for b in ledger)
    assert sorted(k for b in ledger for k in b["keys"]) == sorted(A.RequestCache(tmp_path / "batch" / "request-cache").load())
    states = [m for m in caplog.messages if m.startswith("batch batch_000001")]
    assert any("validating" in m for m in states) and any("in_progress" in m for m in states)
    assert any("completed, 5 of 5 done, 0 failed" in m for m in states)
    assert after == [] and again.cache_hits == n and again.requests_sent == 0


def test_a_driver_killed_while_polling_resumes_the_same_batches(tmp_path, monkeypatch):
    """kill -9 of the driver while its batches are pending; the rerun polls the batches named in
    batches.json: no batch is created again and every request is answered once."""
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    n = 8
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", answers=gold, batch_polls=10) as server:
        spec = _batch_spec(server, qpath, n)
        (tmp_path / "spec.json").write_text(spec.model_dump_json())
        out = tmp_path / "cell"
        script = textwrap.dedent(f"""
            from raydistill import annotate as A
            spec = A.AnnotationSpec.model_validate_json(open({str(tmp_path / 'spec.json')!r}).read())
            A.annotate_cells([(spec, {str(out)!r})], mode="batch", batch=A.BatchSpec(poll_s=0.05, max_requests=3))
        """)
        # all three batches created, and polling
        _kill_driver_when(script, lambda: server.batch_stats()["retrieves"] > 0, 120, "the driver never polled its batches",
                          poll_s=0.02)
        before = server.batch_stats()
        assert before["batches_created"] == 3 and "completed" not in before["status"].values()
        assert len(json.loads((out / "batches.json").read_text())["batches"]) == 3
        assert not (out / "annotations.parquet").exists()
        run = A.annotate_cells([(spec, out)], mode="batch", batch=A.BatchSpec(poll_s=0.01, max_requests=3))
        after = server.batch_stats()
        log = server.log_entries()
    assert after["batches_created"] == 3 and set(after["status"].values()) == {"completed"}
    assert run.totals.get("batches_created", 0) == 0
    assert len(log) == n and set(ok_counts(log).values()) == {1}
    (cell,) = run.cells
    assert cell.rows == n and cell.failed == 0 and cell.batch_rows == n


def test_rows_that_fail_inside_a_batch_are_sent_again_synchronously(ray_cluster, tmp_path):
    n = 8
    qpath, gold = make_questions(tmp_path, n)
    broken = list(gold)[:3]
    with ServerProcess(tmp_path / "srv", answers=gold, batch_polls=0,
                       batch_kinds_by_question={q: "500" for q in broken}) as server:
        spec = _batch_spec(server, qpath, n)
        run = A.annotate_cells([(spec, tmp_path / "cell")], mode="batch", batch=A.BatchSpec(poll_s=0.01))
        log = server.log_entries()
    (cell,) = run.cells
    in_batch = [e for e in log if e.get("batch")]
    by_hand = [e for e in log if not e.get("batch")]
    assert {e["question"] for e in in_batch if e["kind"] == "500"} == set(broken)
    assert sorted(e["question"] for e in by_hand) == sorted(broken)  # sent again synchronously, once each
    assert cell.batch_rows == n - len(broken) and cell.batch_resent == len(broken) and cell.failed == 0
    assert run.totals["batch_resent"] == len(broken) and cell.rows == n
    rows = {r["question"]: r for r in pq.read_table(cell.annotations_path).to_pylist()}
    for q, r in rows.items():  # the batch price for batch rows, the synchronous price for the others
        full = r["tokens_in"] * 1e-6 + r["tokens_out"] * 2e-6
        assert r["cost_usd"] == pytest.approx(full if q in broken else full / 2)


def test_an_expired_batch_sends_its_unfinished_rows_in_a_new_batch(tmp_path, monkeypatch, capsys):
    """Through `raydistill annotate` with `mode: batch` and `resend: batch`: the first batch expires
    half done, its other half goes into a second batch; the last lines count both."""
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    n = 8
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", answers=gold, batch_polls=0, batch_expire=1) as server:
        cfg = _cap_config(tmp_path, server, qpath)
        cfg.write_text(cfg.read_text() + "mode: batch\nbatch: {poll_s: 0.01, resend: batch}\n")
        assert A.main(["--config", str(cfg), "--json", str(tmp_path / "run.json")]) == 0
        stats = server.batch_stats()
        log = server.log_entries()
    cell = json.loads((tmp_path / "run.json").read_text())["cells"][0]
    assert stats["status"] == {"batch_000001": "expired", "batch_000002": "completed"}
    assert [e["batch"] for e in log] == ["batch_000001"] * (n // 2) + ["batch_000002"] * (n // 2)
    assert len(ok_counts(log)) == n and cell["failed"] == 0 and cell["rows"] == n
    assert cell["batch_resent"] == n // 2 and cell["batch_rows"] == n
    printed = capsys.readouterr().out
    assert (f"batch mode: 2 batch(es) created, {n} rows answered in batches, {n // 2} failed or expired rows sent "
            "again (batch), 0 failed for good") in printed
    ledger = json.loads((tmp_path / "out" / "svamp-mock-cot-L3" / "batches.json").read_text())["batches"]
    assert [(b["round"], b["status"], b["requests"]) for b in ledger] == [(1, "expired", n), (2, "completed", n // 2)]


def test_batch_mode_with_k_samples_stops_at_the_cap_and_a_rerun_sends_the_rest(tmp_path, monkeypatch):
    """Two samples per question, each its own line of a batch, under a cap that covers about half
    of them at batch prices: only the requests that fit go into batches, the run stops with
    SpendCapReached and rows left; a rerun without a cap sends only the rest, and every (question,
    sample) has its row, the samples answered by seed as the synchronous server would."""
    from openai_server import wrong_by_seed

    monkeypatch.setenv(KEY_ENV, SENTINEL)
    n, k, seed = 6, 2, 5
    qpath, gold = make_questions(tmp_path, n)
    with ServerProcess(tmp_path / "srv", answers=gold, batch_polls=0, wrong_by_seed=0.5) as server:
        spec = _batch_spec(server, qpath, n)
        spec = spec.model_copy(update={"samples": k, "teacher": spec.teacher.model_copy(
            update={"temperature": 0.7, "seed": seed, "max_tokens": 200})})
        cfg = A.BatchSpec(poll_s=0.01)
        bound = 0.5 * (400 * 1e-6 + 200 * 2e-6)  # about one request's bound at batch prices
        with pytest.raises(A.SpendCapReached) as stopped:
            A.annotate_cells([(spec, tmp_path / "cell")], mode="batch", batch=cfg, max_spend_usd=5.5 * bound)
        first = server.log_entries()
        run = A.annotate_cells([(spec, tmp_path / "cell")], mode="batch", batch=cfg)
        log = server.log_entries()
    e = stopped.value
    assert 0 < len(first) < n * k and e.rows_left == n * k - len(first) and e.cells_left == 1
    assert 0 < e.spent <= e.cap
    (cell,) = run.cells
    assert len(log) == n * k and set(ok_counts(log).values()) == {1}  # the rest only, each once
    assert cell.rows == n * k and cell.failed == 0 and cell.cache_hits == len(first)
    rows = pq.read_table(cell.annotations_path).to_pylist()
    assert [(r["question"], r["sample"]) for r in rows] == [(q, i) for q in gold for i in range(k)]
    for r in rows:
        sent = prompts.build_messages("svamp", 3, "cot", r["question"])[-1]["content"]
        assert r["correct"] is not wrong_by_seed(sent, seed + r["sample"], 0.5)
