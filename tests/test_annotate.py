"""Annotation stage, the parts that need neither Ray nor a server: prompts, config, cache keys,
the durable cache's file format, the rate-limit bucket, padding, hybrid level choice and the
selection among a question's samples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from raydistill import annotate as A
from raydistill import prompts
from raydistill.annotate import selection
from raydistill.annotate.cells import _ensure_trigger
from raydistill.annotate.selection import Sample
from raydistill.annotate.questions import question_length_levels
from raydistill.annotate.teacher import _classify, _scrub
from raydistill.spec import SpecError, TeacherSpec

REPO = Path(__file__).resolve().parents[1]


# -- prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", prompts.TASKS)
def test_every_level_and_format_builds_a_one_shot_chat(task):
    for fmt in prompts.FORMATS:
        for level in prompts.LEVELS:
            msgs = prompts.build_messages(task, level, fmt, "  What is 1 + 1?  ")
            assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
            assert msgs[-1]["content"] == "What is 1 + 1?"
            assert f"Granularity level {level}" in msgs[0]["content"]
            assert "The answer is" in msgs[2]["content"]
            assert not re.search(r"\{(level_instruction|format_instruction|answer_rule)\}", msgs[0]["content"])


@pytest.mark.parametrize("task", ["svamp", "aqua", "csqa", "strategyqa", "math"])
def test_exemplar_length_grows_with_level(task):
    ex = prompts.exemplar(task)
    words = [len(ex.levels[lv].split()) for lv in prompts.LEVELS]
    assert words == sorted(words) and len(set(words)) == 6, words
    assert words[-1] >= 4 * words[0]
    # every exemplar ends with its own answer, so the extractor agrees with the file
    for text in [*ex.levels.values(), *ex.formats.values()]:
        assert text.rstrip().endswith(f"The answer is {ex.answer}")


def test_exemplars_pass_the_answer_checker():
    from raydistill import answers

    for task in prompts.TASKS:
        ex = prompts.exemplar(task)
        for text in [*ex.levels.values(), *ex.formats.values()]:
            assert answers.is_correct(task, text, answers.normalize_gold(task, ex.answer)), (task, text[-60:])


def test_fingerprints_separate_levels_formats_and_tasks():
    fps = {prompts.template_fingerprint(t, lv, f) for t in ("svamp", "csqa") for lv in (1, 6) for f in ("cot", "sym")}
    assert len(fps) == 8
    assert prompts.template_fingerprint("svamp", None, "cot") not in fps


def test_unwrap_keeps_numbered_steps_on_their_own_lines():
    text = "Intro that is\nwrapped here.\n1. One\ncontinued.\n2. Two.\n\nSo, done. The answer is 3"
    assert prompts.unwrap(text) == "Intro that is wrapped here.\n1. One continued.\n2. Two.\nSo, done. The answer is 3"


def test_prompt_errors_are_clear(tmp_path):
    with pytest.raises(prompts.PromptError, match="granularity level"):
        prompts.build_messages("svamp", 7, "cot", "q")
    with pytest.raises(prompts.PromptError, match="not found"):
        prompts.build_messages("svamp", 1, "cot", "q", prompt_dir=tmp_path)


# -- config ---------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "a.yaml"
    p.write_text(text)
    return p


def test_config_grid_and_cells_expand(tmp_path):
    cfg = A.load_config(_write(tmp_path, f"""
output_dir: {tmp_path}/out
teacher: {{model: openai/gpt-4o, temperature: 0}}
grid: {{tasks: [svamp, gsm8k], levels: [1, 3, 5], formats: [cot, sym]}}
cells:
  - {{task: svamp, level: 1, pad: {{to_level: 5}}}}
  - {{task: svamp, hybrid: {{by: question_length}}}}
"""))
    cells = cfg.expand()
    assert len(cells) == 2 * 3 * 2 + 2
    names = [s.cell_name() for s, _ in cells]
    assert "svamp-gpt-4o-cot-L1-pad5" in names and "gsm8k-gpt-4o-sym-L5" in names
    assert all(Path(s.runtime.cache_dir) == tmp_path / "out" / "request-cache" for s, _ in cells)
    assert len({s.cell_hash() for s, _ in cells}) == len(cells)


@pytest.mark.parametrize(
    "teacher, message",
    [
        ("{model: openai/gpt-4o, api_key: sk-123}", "API keys are never read from a config"),
        ("{model: openai/gpt-4o, extra_params: {api_key: sk-1}}", "API keys are never read from a config"),
        ("{model: openai/gpt-4o, temperature: 5}", "teacher.temperature"),
        ("{temperature: 0}", "teacher.model: Field required"),
    ],
)
def test_config_errors_name_the_field(tmp_path, teacher, message):
    p = _write(tmp_path, f"output_dir: out\nteacher: {teacher}\ngrid: {{tasks: [svamp]}}\n")
    with pytest.raises(SpecError) as e:
        A.load_config(p)
    assert message in str(e.value)
    assert "sk-1" not in str(e.value)


def test_config_errors_levels_and_yaml(tmp_path):
    with pytest.raises(SpecError, match="grid.levels"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\ngrid: {tasks: [svamp], levels: [7]}\n"))
    with pytest.raises(SpecError, match="not valid YAML"):
        A.load_config(_write(tmp_path, "output_dir: [\n"))
    with pytest.raises(SpecError, match="nothing to annotate"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\n"))
    with pytest.raises(SpecError, match="exactly one of level"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\ncells: [{task: svamp}]\n"))


def test_cell_hash_ignores_runtime_but_not_sampling():
    base = A.AnnotationSpec(task="svamp", level=2, teacher={"model": "openai/x"})
    faster = base.model_copy(update={"runtime": A.RuntimeSpec(concurrency=512)})
    hotter = A.AnnotationSpec(task="svamp", level=2, teacher={"model": "openai/x", "temperature": 0.7})
    assert base.cell_hash() == faster.cell_hash() != hotter.cell_hash()


def test_runtime_layout_reaches_the_concurrency():
    for c in (1, 8, 64, 256):
        actors, per_actor, batch, calls = A.RuntimeSpec(concurrency=c, num_actors=2, batch_size=16).layout()
        assert actors * per_actor >= c and calls * batch >= per_actor


# -- request keys and the cache -------------------------------------------------------------------


def test_request_key_covers_model_messages_and_params():
    m = [{"role": "user", "content": "hi"}]
    k = A.request_key("openai/x", m, {"temperature": 0, "max_tokens": 10})
    assert k == A.request_key("openai/x", [dict(m[0])], {"max_tokens": 10, "temperature": 0})
    assert k != A.request_key("openai/y", m, {"temperature": 0, "max_tokens": 10})
    assert k != A.request_key("openai/x", m, {"temperature": 0, "max_tokens": 11})
    assert k != A.request_key("openai/x", [{"role": "user", "content": "hi!"}], {"temperature": 0, "max_tokens": 10})


def test_cache_survives_a_torn_last_line_and_filters_keys(tmp_path):
    cache = A.RequestCache(tmp_path / "c")
    w1, w2 = cache.writer(), cache.writer(fsync=True)
    w1.append({"key": "a" * 64, "response": "one"})
    w2.append({"key": "b" * 64, "response": "two \u00e9"})
    w1.close()
    w2.close()
    with open(w1.path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"key": "' + b"c" * 64 + b'", "respo')
    assert cache.load() == {"a" * 64: {"key": "a" * 64, "response": "one"},
                            "b" * 64: {"key": "b" * 64, "response": "two \u00e9"}}
    assert set(cache.load({"b" * 64, "z" * 64})) == {"b" * 64}
    assert len(cache.shards()) == 2


def _line(key: str, response, t: float = 0.0) -> bytes:
    return (json.dumps({"key": key, "response": response, "t": t}) + "\n").encode()


def test_cache_reads_every_whole_record_around_damage_and_names_the_line(tmp_path, caplog):
    """A torn append in the middle of a shard (a full disk, then more appends), a null response
    and one key with two different responses: every whole record is served, each problem is
    logged with its shard and line, and damaged records are not served (their requests go out again)."""
    root = tmp_path / "c"
    root.mkdir()
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    shard = root / "one.jsonl"
    torn = _line(b, "lost half")[:30]
    shard.write_bytes(_line(a, "first", t=1) + torn + _line(c, "after the tear") + _line(d, None)
                      + _line(a, "second", t=2))
    other = root / "two.jsonl"
    other.write_bytes(_line(b, "from the other shard"))
    with caplog.at_level("WARNING", logger="raydistill.annotate"):
        got = A.RequestCache(root).load()
    assert {k: r["response"] for k, r in got.items()} == {a: "first", b: "from the other shard", c: "after the tear"}
    warning = caplog.text
    assert f"{shard}:2: torn" in warning
    assert f"{shard}:3: response is NoneType" in warning
    assert f"{shard}:4: key {a[:12]} has another response at {shard}:1" in warning
    # the wanted-keys filter sees the record behind the tear too
    assert set(A.RequestCache(root).load({c})) == {c}


FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    from raydistill import annotate as A
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    writer = A.RequestCache(sys.argv[1]).writer()
    resource.setrlimit(resource.RLIMIT_FSIZE, (400, resource.RLIM_INFINITY))
    written = 0
    try:
        for i in range(100):
            writer.append({"key": f"{i:064d}", "response": "x" * 50})
            written += 1
    except A.CacheWriteError as err:
        print(json.dumps({"written": written, "error": str(err)}))
        try:
            writer.append({"key": "f" * 64, "response": "after the failure"})
        except A.CacheWriteError:
            sys.exit(0)
    sys.exit(1)
""")


def test_a_failing_cache_write_stops_with_a_clear_error_and_leaves_the_shard_whole(tmp_path):
    """A real failing write (the file size limit makes write() fail half way, as a full disk
    does): the partial record is cut back off, the writer refuses further appends, and every
    record written before is served."""
    root = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(root)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= report["written"] < 100
    assert "could not append" in report["error"] and "rerun" in report["error"]
    (shard,) = A.RequestCache(root).shards()
    assert str(shard) in report["error"]
    assert shard.read_bytes().endswith(b"\n")  # no torn tail
    assert set(A.RequestCache(root).load()) == {f"{i:064d}" for i in range(report["written"])}


# -- rate limiting --------------------------------------------------------------------------------


def test_token_bucket_reserves_in_order():
    now = [0.0]
    b = A.TokenBucket(rate_per_s=10, capacity=5, clock=lambda: now[0])
    delays = [b.reserve(1) for _ in range(8)]
    assert delays[:5] == [0.0] * 5
    assert delays[5:] == pytest.approx([0.1, 0.2, 0.3])
    now[0] = 10.0  # refilled, but never above capacity
    assert [b.reserve(1) for _ in range(5)] == [0.0] * 5
    assert b.reserve(1) == pytest.approx(0.1)
    b.adjust(-10)  # a refund cannot exceed capacity
    assert b.level <= b.capacity


def test_rate_limiter_takes_the_slower_bucket():
    lim = A.RateLimiter(requests_per_minute=600, tokens_per_minute=6000, burst_s=1.0)
    # 10 req/s and 100 tok/s: requests of 50 tokens are limited by tokens (2/s)
    delays = [lim.reserve(50) for _ in range(6)]
    assert delays[:2] == [0.0, 0.0]
    assert delays[-1] == pytest.approx(2.0, rel=0.05)


# -- failures -------------------------------------------------------------------------------------


def test_classify_retries_only_transient_errors():
    import litellm

    def err(cls, status, **kw):
        e = cls.__new__(cls)
        Exception.__init__(e, "x")
        e.status_code = status
        return e

    assert _classify(err(litellm.RateLimitError, 429))[:2] == (True, "rate_limit")
    assert _classify(err(litellm.InternalServerError, 500))[:2] == (True, "http_500")
    assert _classify(err(litellm.Timeout, 408))[:2] == (True, "timeout")
    assert _classify(TimeoutError())[0] is True
    assert _classify(err(litellm.AuthenticationError, 401))[:2] == (False, "http_401")
    assert _classify(err(litellm.BadRequestError, 400))[:2] == (False, "http_400")


def test_scrub_removes_secrets():
    assert _scrub("bad key sk-SECRET-1 given", ["sk-SECRET-1", ""]) == "bad key *** given"


# -- padding and hybrid ---------------------------------------------------------------------------


def test_padding_reaches_the_target_and_keeps_the_answer_last():
    text = "Divide 290 by 2 to get 145. The answer is 145"
    padded = A.pad_rationale(text, 30)
    assert len(padded.split()) == 30
    assert padded.endswith("The answer is 145")
    content = [w for w in padded.split() if w != "..."]
    assert content == text.split()
    assert A.pad_rationale(text, 5) == text  # already long enough
    assert A.pad_rationale("no trigger here", 6, filler="<pad> <pad>").endswith("<pad> <pad>")


def test_hybrid_by_question_length_splits_at_the_quantile():
    t = pa.table({"question": ["a b", "a b c d e f", "a", "a b c d e f g h i"]})
    levels = question_length_levels(t, A.HybridSpec(by="question_length", easy_level=2, hard_level=6))
    assert levels == [2, 6, 2, 6]


def test_ensure_trigger_appends_the_extracted_answer():
    assert _ensure_trigger("2+2 is 4.", "4") == "2+2 is 4. The answer is 4"
    assert _ensure_trigger(" So 4. The answer is 4 ", "4") == "So 4. The answer is 4"


# -- samples per question and their selection -----------------------------------------------------


def _samples(*replies: tuple[bool, bool | None, str | None]) -> list[Sample]:
    """(succeeded, correct, extracted) per sample, in sample order."""
    return [Sample(i, ok, correct, extracted) for i, (ok, correct, extracted) in enumerate(replies)]


def _kept(samples: list[Sample], policy: str, cap: int | None = None) -> list[int]:
    return [s.index for s in selection.select(samples, policy, cap)]


def test_each_policy_keeps_its_samples():
    samples = _samples((True, False, "5"), (False, None, None), (True, True, "4"), (True, False, "5"),
                       (True, True, "4"))
    assert _kept(samples, "keep_all") == [0, 2, 3, 4]  # a failed sample is never kept
    assert _kept(samples, "keep_correct") == [2, 4]
    assert _kept(samples, "keep_first_correct") == [2]
    assert _kept(samples, "keep_majority") == [0, 3]  # a 2-2 tie: the answer seen first wins
    assert _kept(samples, "keep_all", 2) == [0, 2] and _kept(samples, "keep_majority", 1) == [0]
    assert selection.questions_kept([samples, _samples((True, False, "1"), (True, None, None))]) == {
        "keep_all": 2, "keep_correct": 1, "keep_first_correct": 1, "keep_majority": 2}


def test_majority_needs_no_gold_and_compares_answers_with_the_task_grader():
    from raydistill import answers

    ungraded = _samples((True, None, "B"), (True, None, "C"), (True, None, "C"), (True, None, None))
    assert _kept(ungraded, "keep_majority") == [1, 2] and _kept(ungraded, "keep_correct") == []
    latex = _samples((True, None, "0.5"), (True, None, "\\text{Yes}"), (True, None, "yes"))
    same = lambda a, b: answers.same_answer("math", a, b)  # noqa: E731
    assert [s.index for s in selection.keep_majority(latex, same)] == [1, 2]  # by the grader: \text{} and case go
    assert [s.index for s in selection.keep_majority(latex)] == [0]  # as plain strings: three answers, a tie
    assert selection.keep_majority(_samples((False, None, None)), same) == []


def test_samples_need_a_sampling_teacher_and_leave_one_sample_cells_as_they_were(tmp_path):
    base = A.AnnotationSpec(task="svamp", level=2, teacher={"model": "openai/x", "temperature": 0.7, "seed": 3})
    one = A.AnnotationSpec(task="svamp", level=2, teacher=base.teacher, samples=1, max_per_question=None)
    assert one.cell_hash() == base.cell_hash() and one.cell_name() == base.cell_name() == "svamp-x-cot-L2"
    three = base.model_copy(update={"samples": 3, "policy": "keep_majority"})
    assert three.cell_hash() != base.cell_hash() and three.cell_name() == "svamp-x-cot-L2-k3-keep_majority"
    capped = base.model_copy(update={"max_per_question": 1})
    assert capped.cell_hash() != base.cell_hash() and capped.cell_name() == "svamp-x-cot-L2-max1"
    # Sample 0 is the plain request; the others carry their index and a seed moved on by it.
    m = [{"role": "user", "content": "hi"}]
    t = base.teacher
    assert t.sample_params(0) == t.sampling_params() and t.sample_params(2)["seed"] == 5
    assert A.request_key("openai/x", m, t.sample_params(0), 0) == A.request_key("openai/x", m, t.sampling_params())
    keys = {A.request_key("openai/x", m, t.sample_params(i), i) for i in range(3)}
    unseeded = t.model_copy(update={"seed": None})
    assert len(keys) == 3 and A.request_key("openai/x", m, unseeded.sample_params(1), 1) != \
        A.request_key("openai/x", m, unseeded.sample_params(0), 0)
    with pytest.raises(SpecError) as e:
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\nsamples: 4\ngrid: {tasks: [svamp]}\n"))
    assert "samples: 4 needs teacher.temperature > 0" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SpecError, match="samples: 2 needs"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\n"
                                       "cells: [{task: svamp, level: 1, samples: 2}]\n"))


def test_a_sweep_grid_sets_samples_and_policy_of_its_generated_cells():
    from raydistill.spec import sweep_from_dict
    from raydistill.sweep import annotation_spec

    base = {"name": "k", "datasets": ["svamp"], "teachers": ["gpt"], "levels": [3], "students": ["tiny-llama"],
            "annotation": {"teachers": {"gpt": {"model": "openai/gpt-4o-mini", "temperature": 0.8}}}}
    spec = sweep_from_dict({**base, "grids": [{}, {"samples": 4, "policy": "keep_majority"},
                                              {"samples": 4, "policy": "keep_correct", "max_per_question": 2}]})
    plain, majority, capped = spec.cells()
    assert plain.model_dump(mode="json") == sweep_from_dict(base).cells()[0].model_dump(mode="json")
    assert [t.axes()["teacher"] for t in spec.trials()] == [
        "gpt", "gpt[k4-keep_majority]", "gpt[k4-keep_correct-max2]"]
    made = annotation_spec(capped, spec)
    assert (made.samples, made.policy, made.max_per_question) == (4, "keep_correct", 2)
    assert annotation_spec(plain, spec).samples == 1
    assert len({c.cell_hash for c in spec.cells()}) == 3
    with pytest.raises(SpecError, match="grids\\[0\\]: teacher gpt: samples: 2 needs teacher.temperature"):
        sweep_from_dict({**base, "annotation": {"teachers": {"gpt": {"model": "m"}}}, "grids": [{"samples": 2}]})
    with pytest.raises(SpecError, match="only released teachers"):
        sweep_from_dict({**base, "teachers": ["chatgpt"], "grids": [{"policy": "keep_majority"}]})


def test_spend_gate_keeps_spent_plus_in_flight_within_the_cap_and_closes_at_the_first_refusal():
    from raydistill.annotate.spend import SpendGate, request_bound

    gate = SpendGate(1.0)
    assert gate.reserve(0.4) and gate.reserve(0.4)
    assert not gate.reserve(0.3)  # 0.8 in flight + 0.3 > 1.0: closed
    assert gate.state()["in_flight_at_close"] == 2 and gate.state()["closed_at"] is not None
    gate.settle(0.4, 0.1)
    assert not gate.reserve(0.01)  # closed stays closed, though 0.01 would fit now
    gate.settle(0.4, 0.2)
    assert gate.state()["spent"] == pytest.approx(0.3) and gate.state()["in_flight"] == 0
    teacher = TeacherSpec(model="openai/mock", max_tokens=100)
    messages = [{"role": "user", "content": "How many sheep are there now?"}]
    bound = request_bound(teacher, (1e-6, 2e-6), messages)
    assert bound > 100 * 2e-6 and bound < 100 * 2e-6 + 50 * 1e-6  # max_tokens as output + a few input tokens


def test_a_cap_needs_a_price_from_the_table_or_the_config():
    from raydistill.annotate.spend import check_priced, token_prices

    assert token_prices(TeacherSpec(model="openai/gpt-4o"))[1] > token_prices(TeacherSpec(model="openai/gpt-4o"))[0]
    assert token_prices(TeacherSpec(model="openai/mine", output_cost_per_token=2e-6)) == (0.0, 2e-6)
    check_priced([TeacherSpec(model="openai/mine")], None)  # no cap: nothing to check
    with pytest.raises(SpecError, match="openai/mine has no price"):
        check_priced([TeacherSpec(model="openai/gpt-4o"), TeacherSpec(model="openai/mine")], 5.0)


def test_cap_and_batch_settings_in_configs_leave_cells_and_trials_as_they_were(tmp_path):
    from raydistill.annotate.batch import check_batch_teachers
    from raydistill.spec import sweep_from_dict

    cfg = A.load_config(_write(tmp_path, """
output_dir: out
teacher: {model: openai/gpt-4o}
grid: {tasks: [svamp], levels: [3]}
max_spend_usd: 12.5
mode: batch
batch: {resend: batch, max_requests: 1000}
"""))
    plain = A.load_config(_write(tmp_path, "output_dir: out\nteacher: {model: openai/gpt-4o}\ngrid: {tasks: [svamp], levels: [3]}\n"))
    assert (cfg.max_spend_usd, cfg.mode, cfg.batch.resend, cfg.batch.max_requests) == (12.5, "batch", "batch", 1000)
    assert [s.cell_hash() for s, _ in cfg.expand()] == [s.cell_hash() for s, _ in plain.expand()]
    with pytest.raises(SpecError, match="batch.resend"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\ngrid: {tasks: [svamp]}\nbatch: {resend: later}\n"))
    with pytest.raises(SpecError, match="max_spend_usd"):
        A.load_config(_write(tmp_path, "output_dir: o\nteacher: {model: m}\ngrid: {tasks: [svamp]}\nmax_spend_usd: -1\n"))
    base = {"name": "k", "datasets": ["svamp"], "teachers": ["gpt"], "levels": [3], "students": ["tiny-llama"],
            "annotation": {"teachers": {"gpt": {"model": "openai/gpt-4o-mini"}}}}
    capped = sweep_from_dict({**base, "annotation": {**base["annotation"], "max_spend_usd": 3, "mode": "batch"}})
    assert capped.annotation.max_spend_usd == 3 and capped.annotation.mode == "batch"
    assert [t.trial_hash for t in capped.trials()] == [t.trial_hash for t in sweep_from_dict(base).trials()]
    check_batch_teachers([TeacherSpec(model="openai/gpt-4o"), TeacherSpec(model="hosted_vllm/llama")])
    with pytest.raises(SpecError, match="mode: batch: teacher anthropic/claude-3-5-haiku-20241022 goes through"):
        check_batch_teachers([TeacherSpec(model="anthropic/claude-3-5-haiku-20241022")])


def test_batch_prices_come_from_litellm_s_batch_keys_or_the_discount():
    from raydistill.annotate.batch import batch_prices

    import litellm

    info = litellm.model_cost["gpt-4o"]
    assert batch_prices(TeacherSpec(model="openai/gpt-4o"), 0.5) == (info["input_cost_per_token_batches"],
                                                                      info["output_cost_per_token_batches"])
    assert batch_prices(TeacherSpec(model="openai/mine", input_cost_per_token=2e-6, output_cost_per_token=4e-6),
                        0.5) == (1e-6, 2e-6)
    assert batch_prices(TeacherSpec(model="openai/mine"), 0.5) is None


def test_batch_requests_are_cut_within_the_request_and_byte_limits(tmp_path):
    from raydistill.annotate.batch import BatchRunner
    from raydistill.annotate.cells import PlannedRequest

    teacher = TeacherSpec(model="openai/mock", temperature=0, max_tokens=64)
    reqs = [PlannedRequest(f"k{i:03d}", 0, "svamp", "1", [{"role": "user", "content": "x" * (100 + i)}], "h")
            for i in range(10)]
    runner = BatchRunner([teacher], A.BatchSpec(max_requests=4, max_bytes=1024), tmp_path, False)
    chunks = runner.chunks(reqs)
    assert [r.key for c, _ in chunks for r in c] == [r.key for r in reqs]
    assert all(len(c) <= 4 and len(data) <= 1024 for c, data in chunks) and len(chunks) >= 3
    line = json.loads(chunks[0][1].splitlines()[0])
    assert line == {"custom_id": "k000", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "mock", "messages": reqs[0].messages, "temperature": 0.0, "max_tokens": 64}}
    with pytest.raises(SpecError, match="batch.max_bytes"):
        BatchRunner([teacher], A.BatchSpec(max_requests=4, max_bytes=1024), tmp_path, False).chunks(
            [PlannedRequest("big", 0, "svamp", "1", [{"role": "user", "content": "x" * 2000}], "h")])
