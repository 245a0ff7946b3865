"""Dataset registry: test-set sizes, the SVAMP split, leak removal, source resolution, errors.

Reads the mirror at ../shared/data (or $RAYDISTILL_DATA_DIR). Downloads only ever go to an HTTP
server on 127.0.0.1 that the tests start.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import answers, datasets
from raydistill.datasets import (ChecksumMismatch, DataUnavailable, MalformedData, available_cells,
                                 contamination, load_test, load_train, resolve)
from raydistill.schemas import EXAMPLE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("RAYDISTILL_DATA_DIR") or REPO.parent / "shared" / "data")
TEST_SIZES = {"svamp": 300, "gsm8k": 1319, "aqua": 254, "math": 500, "csqa": 1221, "obqa": 500,
              "strategyqa": 290}
NOT_MIRRORED = "distilling-cot/train/gsm8k_ChatGPT_level1_ranked.json"  # >= 4 MiB upstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def data_env(monkeypatch, tmp_path):
    """Mirror = the shared mirror; cache = a temp dir; downloads = a closed local port."""
    assert (MIRROR / datasets.DATASET_INFO).is_file(), f"data mirror missing at {MIRROR}"
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(MIRROR))
    monkeypatch.setenv("RAYDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYDISTILL_DATA_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAYDISTILL_DOWNLOAD_TIMEOUT", "5")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A static HTTP server on 127.0.0.1 laid out like raw.githubusercontent.com."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("RAYDISTILL_DATA_URL", base)

    def publish(relpath: str, content: bytes) -> None:
        target = root / datasets.upstream_url(relpath)[len(base) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    yield publish
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _ids(table: pa.Table) -> set[str]:
    return set(table.column("question_id").to_pylist())


# ------------------------------------------------------------------------------ test sets


@pytest.mark.parametrize("task,size", TEST_SIZES.items())
def test_test_set_size_and_schema(task, size):
    table = load_test(task)
    assert table.num_rows == size
    assert table.schema.equals(EXAMPLE_SCHEMA)
    assert len(_ids(table)) == size  # no duplicate questions
    assert all(table.column("answer").to_pylist())  # every test row has a gold answer


def test_svamp_test_is_svamp_minus_the_700_training_questions():
    test, train = load_test("svamp"), load_train("svamp", "answer_only")
    everything = json.loads((MIRROR / "mammoth2-math-eval/SVAMP/SVAMP.json").read_text())
    all_ids = {datasets.question_id(f"{r['Body']} {r['Question']}") for r in everything}
    assert (len(everything), train.num_rows, test.num_rows) == (1000, 700, 300)
    assert _ids(test) & _ids(train) == set()
    assert _ids(test) | _ids(train) == all_ids


def test_test_rows_are_normalised():
    aqua = load_test("aqua").slice(0, 1).to_pylist()[0]
    assert aqua["question"].endswith("Answer Choices: (A) 5(√3 + 1) (B) 6(√3 + √2) "
                                     "(C) 7(√3 – 1) (D) 8(√3 – 2) (E) None of these")
    assert (aqua["answer"], aqua["source"]) == ("A", "mammoth2-math-eval/AQuA/AQuA.json#0")
    gsm = load_test("gsm8k").slice(0, 1).to_pylist()[0]
    assert gsm["answer"] == "18" and gsm["rationale"].endswith("#### 18")
    assert load_test("svamp").column("answer").to_pylist()[0] == "51"
    assert set(load_test("strategyqa").column("answer").to_pylist()) == {"True", "False"}


def test_question_id_is_stable():
    assert datasets.question_id("  Hello \n World ") == "2aae6c35c94fcfb4"  # sha1("hello world")
    assert datasets.question_id("hello world") == datasets.question_id("HELLO\tWORLD")
    assert datasets.question_id("hello world") != datasets.question_id("hello worlds")
    assert load_test("obqa").column("question_id").equals(load_test("obqa").column("question_id"))


# -------------------------------------------------------------------------- training sets


def test_registry_covers_every_dataset_info_entry():
    info = json.loads((MIRROR / datasets.DATASET_INFO).read_text())
    assert sum(len(available_cells(t)) for t in datasets.TASKS) == len(info) == 156
    tf = datasets.train_file
    assert (tf("math", "chatgpt", 3).path, tf("math", "chatgpt", 3).response) == (
        "distilling-cot/train/math_mix_level3.json", "chatgpt_output")
    assert tf("math", "gemini", 2).response == "gemini_output"
    assert (tf("math", "answer_only").path, tf("math", "answer_only").response) == (
        "distilling-cot/train/math_human.json", "output")
    assert tf("math", "human").response == "solution"
    assert tf("svamp", "chatgpt", 5, "sym").path.endswith("/0_SVAMP_chatgpt_level5SYM.json")
    assert tf("gsm8k", "chatgpt", 3, "bsm").path.endswith("/0_gsm8k_chatgpt_level3BSM.json")
    assert tf("obqa", "chatgpt", 3, "sym").path.endswith(
        "/openbookqa_chatgpt_symbolic_level3_ranked.json")
    assert tf("csqa", "human").path.endswith("/ecqa_train.json")
    assert [c.level for c in available_cells("svamp") if c.teacher == "llama"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="svamp has no released cell llama/L5"):
        tf("svamp", "llama", 5)
    with pytest.raises(ValueError, match="needs a level"):
        tf("svamp", "chatgpt")


def test_availability_reports_unmirrored_cells_without_crashing():
    svamp = available_cells("svamp")
    assert len(svamp) == 24 and all(c.where == "mirror" for c in svamp)
    gsm = {(c.teacher, c.level, c.format): c for c in available_cells("gsm8k")}
    assert [gsm["chatgpt", k, "cot"].offline for k in range(1, 7)] == [False] * 6
    assert gsm["gemini", 1, "cot"].where == "mirror"
    assert all(c.offline for c in available_cells("math"))


def test_load_train_rows_and_answers():
    table = load_train("svamp", "chatgpt", 1)
    assert table.schema.equals(EXAMPLE_SCHEMA) and table.num_rows == 700
    first = table.slice(0, 1).to_pylist()[0]
    assert first["answer"] == "145" and first["rationale"].endswith("The answer is 145")
    assert first["source"] == "distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json#0"
    math = load_train("math", "chatgpt", 1)
    assert math.num_rows == 1297 and math.slice(0, 1).to_pylist()[0]["answer"] == "52"


@pytest.mark.parametrize("task", ["svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa"])
def test_answer_only_targets_are_graded_correct(task):
    """A student that reproduces its answer-only target exactly is graded correct: the released
    bare labels ("B", "True") become "The answer is B." (0 % of them matched as released)."""
    table = load_train(task, "answer_only")
    rows = table.to_pylist()
    assert all(r["rationale"].startswith("The answer is ") and r["rationale"].endswith(".") for r in rows)
    correct = sum(bool(r["answer"]) and answers.is_correct(task, r["rationale"], r["answer"]) for r in rows)
    assert correct / len(rows) >= 0.99
    assert datasets.target_ceiling(task, table) == pytest.approx(correct / len(rows))
    bare = [r["rationale"].removeprefix("The answer is ").removesuffix(".") for r in rows[:200]]
    if task in ("csqa", "obqa", "strategyqa", "math"):  # the bare released form is not gradable
        assert sum(answers.is_correct(task, b, r["answer"]) for b, r in zip(bare, rows)) < 0.95 * len(bare)


def test_target_ceiling_and_the_opt_in_repair():
    """Human MATH solutions often leave the final answer unmarked; teacher MATH files lost the "\\f" of
    \\frac and the "\\b" of \\boxed to JSON. The repair (opt-in) fixes both."""
    released = load_train("math", "human")
    repaired = load_train("math", "human", repair=True)
    assert released.column("question_id").equals(repaired.column("question_id"))
    low, high = datasets.target_ceiling("math", released), datasets.target_ceiling("math", repaired)
    assert 0.80 < low < 0.90 and high > 0.98
    changed = [(a, b) for a, b in zip(released.column("rationale").to_pylist(),
                                      repaired.column("rationale").to_pylist()) if a != b]
    assert any(b.endswith(".") and "The answer is" in b and "The answer is" not in a for a, b in changed)
    assert datasets.target_ceiling("math", released.slice(0, 0)) is None
    gemini = load_train("math", "gemini", 3).column("rationale").to_pylist()
    fixed = load_train("math", "gemini", 3, repair=True).column("rationale").to_pylist()
    eaten = [i for i, text in enumerate(gemini) if "\x0c" in text or "\x08" in text]
    assert len(eaten) >= 30 and not any("\x0c" in fixed[i] or "\x08" in fixed[i] for i in eaten)
    assert any("\\frac" in fixed[i] and "\\frac" not in gemini[i] for i in eaten)  # JSON ate "\f" of \frac


def test_repair_marks_only_unmarked_wrong_targets():
    assert datasets.repair_target("svamp", "So 3 + 4 = 7 apples", "7") == "So 3 + 4 = 7 apples"  # correct already
    assert datasets.repair_target("obqa", "Thus the best answer is C", "C") == "Thus the best answer is C The answer is C."
    assert datasets.repair_target("svamp", "The answer is 8", "7") == "The answer is 8"  # the teacher's error stays
    assert datasets.repair_gold("2\\sqrt{5") == "2\\sqrt{5}"


def test_sources_and_digests_follow_the_files_read():
    sources = datasets.train_sources("svamp", "chatgpt", 1)
    assert {"distilling-cot/train/SVAMP_ChatGPT_level1_ranked.json", "distilling-cot/train/SVAMP_only_ans.json",
            "mammoth2-math-eval/SVAMP/SVAMP.json", datasets.DATASET_INFO} == set(sources)
    assert datasets.test_sources("gsm8k") == ["mammoth2-math-eval/gsm8k/gsm8k.jsonl"]
    digests = datasets.digests(sources)
    assert all(len(d) == 64 for d in digests.values()) and len(set(digests.values())) == len(sources)


def test_math_gemini_level1_rows_without_the_teacher_column_are_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="raydistill.datasets"):
        table = load_train("math", "gemini", 1)
    assert table.num_rows == 1297 - 195
    assert "skipped 195 rows without column 'gemini_output'" in caplog.text


def test_strategyqa_human_file_leak_is_reported_and_removed(caplog):
    report = contamination("strategyqa")
    by_path = {o.path: o for o in report.sources}
    human = by_path["distilling-cot/train/stqa_human_annotation.json"]
    assert (human.rows, human.id_overlap, human.text_overlap) == (2290, 290, 290)
    assert all(o.id_overlap == 0 for p, o in by_path.items() if o is not human)
    with caplog.at_level(logging.WARNING, logger="raydistill.datasets"):
        train = load_train("strategyqa", "human")
    assert train.num_rows == 2000
    assert _ids(train) & _ids(load_test("strategyqa")) == set()
    assert "dropped 290 of 2290" in caplog.text


def test_csqa_text_overlap_sees_through_the_choice_layout():
    test_q = "A revolving door is at a what? Answer Choices:\nA. bank\nB. library\n"
    train_q = "Q: A revolving door is at a what? Answer choices: A: bank, B: library"
    assert datasets.text_key(test_q) == datasets.text_key(train_q)
    assert datasets.question_id(test_q) != datasets.question_id(train_q)


def test_write_parquet_round_trip_and_schema_check(tmp_path):
    table = load_test("strategyqa")
    datasets.write_parquet(table, tmp_path / "sub" / "t.parquet")
    assert pq.read_table(tmp_path / "sub" / "t.parquet").equals(table)
    with pytest.raises(ValueError, match="EXAMPLE_SCHEMA"):
        datasets.write_parquet(table.drop_columns(["source"]), tmp_path / "bad.parquet")


# ---------------------------------------------------------------------- source resolution


def test_upstream_json_is_pinned_from_the_mirror():
    pinned = json.loads(datasets.MANIFEST.read_text())
    assert datasets.build_manifest(MIRROR) == pinned
    missing = [p for p, e in pinned["files"].items() if e["sha256"] is None]
    assert len(missing) == 53 and NOT_MIRRORED in missing
    assert all(not (MIRROR / p).exists() for p in missing)


def test_unmirrored_file_raises_one_clear_error():
    with pytest.raises(DataUnavailable) as err:
        load_train("gsm8k", "chatgpt", 1)
    message = str(err.value)
    assert "\n" not in message
    assert NOT_MIRRORED in message and str(MIRROR) in message
    assert "RAYDISTILL_DATA_DIR" in message and "go online" in message


def test_download_verifies_sha256_and_caches(server, tmp_path, monkeypatch):
    rel = "distilling-cot/test/strategyQA_test.json"
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(tmp_path / "empty-mirror"))
    content = (MIRROR / rel).read_bytes()
    server(rel, content)
    path = resolve(rel)
    assert path == tmp_path / "cache" / rel and path.read_bytes() == content
    pinned = json.loads(datasets.MANIFEST.read_text())["files"][rel]["sha256"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pinned
    assert load_test("strategyqa").num_rows == 290  # read from the cache
    monkeypatch.setenv("RAYDISTILL_DATA_URL", f"http://127.0.0.1:{_closed_port()}")
    assert resolve(rel) == path  # second time: no network needed


def test_download_checksum_mismatch_deletes_and_raises(server, tmp_path, monkeypatch):
    rel = "distilling-cot/test/strategyQA_test.json"
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(tmp_path / "empty-mirror"))
    server(rel, (MIRROR / rel).read_bytes().replace(b"False", b"True"))
    with pytest.raises(ChecksumMismatch, match="does not match the pinned"):
        resolve(rel)
    assert not (tmp_path / "cache" / rel).exists()
    assert list((tmp_path / "cache" / rel).parent.iterdir()) == []  # no partial file left


def test_download_404_is_data_unavailable(server):
    with pytest.raises(DataUnavailable, match="HTTP Error 404"):
        resolve(NOT_MIRRORED)


def test_unpinned_download_is_accepted_with_a_warning(server, tmp_path, caplog):
    server(NOT_MIRRORED, b"[]")
    with caplog.at_level(logging.WARNING, logger="raydistill.datasets"):
        assert resolve(NOT_MIRRORED).read_bytes() == b"[]"
    assert "no pinned sha256" in caplog.text


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small_mirror(tmp_path, monkeypatch):
    """A mirror with StrategyQA's files only, whose files a test may overwrite."""
    root = tmp_path / "mirror"
    for rel in (datasets.DATASET_INFO, "distilling-cot/test/strategyQA_test.json",
                "distilling-cot/train/strategyQA_onlyans.json",
                "distilling-cot/train/strategyQA_chatgpt_level_1_ranked.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MIRROR / rel, root / rel)
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(root))

    def write(rel: str, rows) -> None:
        (root / rel).write_text(rows if isinstance(rows, str) else json.dumps(rows))

    return write


CHATGPT_L1 = "distilling-cot/train/strategyQA_chatgpt_level_1_ranked.json"


def test_train_row_without_prompt_column_names_file_row_and_column(small_mirror):
    small_mirror(CHATGPT_L1, [{"instruction": "Is water wet?", "output": "The answer is True"},
                              {"output": "The answer is False"}])
    with pytest.raises(MalformedData) as err:
        load_train("strategyqa", "chatgpt", 1)
    assert str(err.value) == f"{CHATGPT_L1}: row 1 has no column 'instruction'"


def test_test_row_without_label_names_file_row_and_column(small_mirror):
    rel = "distilling-cot/test/strategyQA_test.json"
    small_mirror(rel, [{"instruction": "a?", "label": "True"},
                       {"instruction": "b?", "label": "False"}, {"instruction": "c?"}])
    with pytest.raises(MalformedData, match=rf"^{rel}: row 2 has no column 'label'$"):
        load_test("strategyqa")


def test_unnormalisable_gold_and_bad_json_name_the_file(small_mirror):
    rel = "distilling-cot/test/strategyQA_test.json"
    small_mirror(rel, [{"instruction": "a?", "label": "maybe"}])
    with pytest.raises(MalformedData, match=rf"^{rel}: row 0 gold answer 'maybe'"):
        load_test("strategyqa")
    small_mirror(rel, '[{"instruction": "a?", ')
    with pytest.raises(MalformedData, match=rf"^{rel}: invalid JSON"):
        load_test("strategyqa")


def test_missing_response_rows_are_skipped_unless_all_are_missing(small_mirror):
    small_mirror(CHATGPT_L1, [{"instruction": "Is water wet?", "output": "The answer is True"},
                              {"instruction": "Is fire cold?"}])
    table = load_train("strategyqa", "chatgpt", 1)
    assert table.column("question").to_pylist() == ["Is water wet?"]
    assert table.column("answer").to_pylist() == ["True"]  # extracted: not in answer-only file
    small_mirror(CHATGPT_L1, [{"instruction": "Is water wet?", "response": "True"}])
    with pytest.raises(MalformedData, match="no row has column 'output'"):
        load_train("strategyqa", "chatgpt", 1)


# --------------------------------------------------------------------------------- CLI


def test_cli_export_list_and_contamination(tmp_path, capsys):
    out = tmp_path / "svamp.parquet"
    rc = datasets.main(["export", "--task", "svamp", "--teacher", "chatgpt", "--level", "1",
                        "--out", str(out)])
    assert rc == 0 and pq.read_table(out).schema.equals(EXAMPLE_SCHEMA)
    assert pq.read_table(out).num_rows == 700
    assert datasets.main(["export", "--task", "math", "--split", "test", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 500
    capsys.readouterr()
    assert datasets.main(["list", "--task", "gsm8k"]) == 0
    listing = capsys.readouterr().out
    assert "not available offline  distilling-cot/train/gsm8k_ChatGPT_level1_ranked.json" in listing
    assert datasets.main(["check-contamination", "--task", "strategyqa"]) == 0
    assert "290 id    290 text  of  2290 rows" in capsys.readouterr().out


def test_cli_ceiling_prints_released_and_repaired_ceilings(capsys, caplog):
    caplog.set_level(logging.INFO, logger="raydistill.datasets")
    assert datasets.main(["ceiling", "--task", "obqa"]) == 0
    out = capsys.readouterr().out
    # one reading per cell for both columns: each log line once, one "dropped" count per cell
    logged = [r.getMessage() for r in caplog.records if r.name == "raydistill.datasets"]
    assert len(logged) == len(set(logged)), logged
    cells = [x for x in out.splitlines()[1:] if "not available offline" not in x]
    assert len([m for m in logged if "rows whose question is in the obqa test set" in m]) == len(cells) > 1
    line = next(x for x in out.splitlines() if "gemini/L4" in x)
    assert "94.3 %" in line and "100.0 %" in line  # "the best answer is A" is not the paper's pattern
    assert "(not available offline)" in next(x for x in out.splitlines() if "chatgpt/L3/sym" in x)


def test_cli_export_of_unmirrored_cell_fails_cleanly(tmp_path, capsys):
    rc = datasets.main(["export", "--task", "gsm8k", "--teacher", "chatgpt", "--level", "1",
                        "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and NOT_MIRRORED in err[0]
    assert not (tmp_path / "x.parquet").exists()


# ---------------------------------------------------------------------- export-hf


STUDY_TRIAL = REPO / "docs" / "results" / "svamp-study" / "trials" / "114f48cfccb08b8c"


def _export_hf(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m raydistill data export-hf ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "raydistill", "data", "export-hf", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _exported(folder: Path, out: Path, parquet: str) -> tuple[str, dict[str, str]]:
    """Export ``folder`` with the CLI, check it loads back equal to its ``parquet``; the card and its facts."""
    proc = _export_hf(folder, out)
    assert proc.returncode == 0, proc.stderr
    _loaded_equals_parquet(out, folder / parquet)
    card = (out / "README.md").read_text()
    return card, _facts(card)


def _loaded_equals_parquet(out: Path, parquet: Path) -> None:
    import datasets as hf

    loaded = hf.load_from_disk(str(out))
    table = pq.read_table(parquet)
    assert loaded.num_rows == table.num_rows > 0 and loaded.column_names == table.column_names
    assert loaded.to_list() == table.to_pylist()  # row by row, in order


def _facts(card: str) -> dict[str, str]:
    return dict(line[2:].split(": ", 1) for line in card.splitlines() if line.startswith("- ") and ": " in line)


def _generated_cell(folder: Path) -> Path:
    """A finished cell of a generating teacher, written by the annotation stage's own cell writer
    (`CellState`) from made-up teacher replies: 12 questions, 2 failed, 3 answered wrong, keep_correct."""
    from raydistill.annotate.cache import prompt_hash
    from raydistill.annotate.cells import CellState, PlannedRequest, RequestTarget
    from raydistill.annotate.questions import load_questions
    from raydistill.prompts import build_messages
    from raydistill.spec.annotation import AnnotationSpec, QuestionsSpec, TeacherSpec

    teacher = TeacherSpec(model="openai/tiny-teacher", api_base="http://user:s3cret-pass@127.0.0.1:9/v1",
                          api_key_env="TINY_TEACHER_KEY", temperature=0.7, max_tokens=256, seed=5)
    spec = AnnotationSpec(task="svamp", teacher=teacher, level=2, policy="keep_correct",
                          questions=QuestionsSpec(limit=12))
    state = CellState(0, spec, folder, load_questions("svamp", spec.questions), 0)
    for i, (q, gold) in enumerate(zip(state.qtext, state.gold)):
        messages = build_messages("svamp", 2, "cot", q)
        answer = gold if i % 4 else f"{gold}1"  # questions 0, 4, 8 answered wrong
        ok = {"response": f"Some steps. The answer is {answer}", "extracted": answer, "correct": answer == gold,
              "tokens_in": 100, "tokens_out": 20, "cost_usd": 0.25, "latency_s": 0.1, "error": None,
              "error_kind": None, "cache_hit": False, "attempts": 1, "finish_reason": "stop"}
        failed = {**ok, "response": None, "extracted": None, "correct": None, "tokens_out": 0, "cost_usd": 0.0,
                  "error": "500 after 3 attempts", "error_kind": "500", "attempts": 3, "finish_reason": None}
        req = PlannedRequest(f"key{i}", 0, "svamp", gold, messages, prompt_hash(messages))
        state.on_result(RequestTarget(0, i, 2, "main"), req, failed if i in (3, 7) else ok)
    state.close(1.0, {q: k for k, q in enumerate(state.qids)})
    return folder


def test_export_hf_of_a_replayed_cell_loads_back_equal_to_its_parquet(tmp_path):
    from raydistill.spec import sweep_from_dict
    from raydistill.sweep import cell_dir, identify_cell, replay_cell

    spec = sweep_from_dict({"name": "hf", "datasets": ["svamp"], "teachers": ["chatgpt"], "students": ["tiny-llama"],
                            "train_limit": 40, "grids": [{"levels": [3]}]})
    cell = identify_cell(spec.cells()[0], spec)
    folder = Path(replay_cell(cell, cell_dir(tmp_path / "cells", cell))["dir"])
    out = tmp_path / "hf"
    card, facts = _exported(folder, out, "train.parquet")
    assert card.startswith("---\nlicense: [\"apache-2.0\", \"mit\"]\n")
    assert facts["cell hash"] == cell.cell_hash == folder.name
    assert (facts["rows"], facts["questions"], facts["level"], facts["train limit"]) == ("40", "40", "3", "40")
    assert facts["cost (USD)"].startswith("unknown (replayed") and facts["sampling"].startswith("unknown (replayed")
    table = pq.read_table(folder / "train.parquet")
    assert facts["target ceiling"] == f"{100 * datasets.target_ceiling('svamp', table):.1f} %"
    for path, digest in cell.inputs.items():  # every source file with its sha256 and licence
        licence = "MIT" if path.startswith("mammoth2") else "Apache-2.0"
        assert f"| `{path}` | {digest} | " in card and card.split(f"`{path}`")[1].split("\n")[0].endswith(f"| {licence} |")
    assert _export_hf(folder, out).returncode == 1  # OUT is not overwritten unasked
    assert _export_hf(folder / "train.parquet", out, "--overwrite").returncode == 0
    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("mine")
    proc = _export_hf(folder, other, "--overwrite")  # only an earlier export is replaced
    assert proc.returncode == 1 and "not an earlier export" in proc.stderr and (other / "keep.txt").exists()


def test_export_hf_of_a_generated_cell_states_its_teacher_prompts_counts_and_cost(tmp_path):
    folder = _generated_cell(tmp_path / "cell")
    summary = json.loads((folder / "summary.json").read_text())
    card, facts = _exported(folder, tmp_path / "hf", "examples.parquet")
    assert facts["model"] == "openai/tiny-teacher" and facts["temperature"] == "0.7" and facts["seed"] == "5"
    assert facts["prompt texts' sha256"] == summary["identity"]["prompts"][0] and len(facts["prompt texts' sha256"]) == 64
    assert facts["policy"] == "keep_correct" and facts["annotation hash"] == summary["cell_hash"]
    assert facts["saw the gold answer"] == "False" and "cell hash" not in facts  # `raydistill annotate` has no cell.json
    assert (facts["rows"], facts["succeeded"], facts["failed"], facts["kept by the policy"]) == ("7", "10", "2", "7")
    assert facts["teacher requests (rows of annotations.parquet)"] == "12"
    assert facts["teacher accuracy"] == "70.0 %" and facts["target ceiling"] == "100.0 %"
    assert (facts["samples per question"], facts["questions kept"]) == ("1", str(summary["result"]["questions_kept"]))
    assert facts["teacher pass@k"] == f"{100 * summary['result']['teacher_pass_at_k']:.1f} %"
    assert facts["cost (USD, every request priced as if the cache were empty)"] == "2.5000"
    assert "| `distilling-cot/train/SVAMP_only_ans.json` | not recorded | EIT-NLP/" in card
    assert "s3cret" not in card and "127.0.0.1" not in card and "TINY_TEACHER_KEY" not in card


def test_export_hf_of_a_trial_loads_back_its_predictions(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    proc = _export_hf(STUDY_TRIAL, tmp_path / "pushed", "--push-to-hub", "someone/predictions")
    assert proc.returncode == 1 and "HF_TOKEN" in proc.stderr and not (tmp_path / "pushed").exists()
    _, facts = _exported(STUDY_TRIAL, tmp_path / "hf", "predictions.parquet")
    record = json.loads((STUDY_TRIAL / "record.json").read_text())
    assert facts["trial hash"] == record["trial_hash"] and facts["cell hash"] == record["cell"]["hash"]
    assert facts["rows"] == str(record["metrics"]["n_test"])
    correct = sum(pq.read_table(STUDY_TRIAL / "predictions.parquet").column("correct").to_pylist())
    assert facts["graded correct"] == str(correct) and correct == round(record["metrics"]["accuracy"] * 300)


def test_export_hf_without_datasets_names_the_extra(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "__init__.py").write_text("raise ImportError('No module named datasets')\n")
    proc = subprocess.run([sys.executable, "-m", "raydistill", "data", "export-hf", str(STUDY_TRIAL), str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"})
    assert proc.returncode == 1 and proc.stderr.strip() == ("raydistill data: export-hf needs the Hugging Face "
                                                            "`datasets` package: pip install 'raydistill[hf]'")


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "nowhere", ["nowhere", "does not exist", "cell folder"]),
    (lambda p: p, ["is not a cell or trial folder", "train.parquet"]),
    (lambda p: (p / "cell.json").write_text("{}") and p, ["train.parquet or examples.parquet", "run its sweep"]),
    (lambda p: (p / "record.json").write_text("{}") and p, ["predictions.parquet is missing", "rerun its sweep"]),
    (lambda p: (p / "train.parquet").write_text("PAR1 cut") and p, ["train.parquet is not a readable Parquet"]),
], ids=["missing", "empty", "unfinished-cell", "unfinished-trial", "damaged"])
def test_export_hf_bad_input_is_one_line_naming_the_path(tmp_path, make, words):
    (tmp_path / "in").mkdir()
    path = make(tmp_path / "in")
    proc = _export_hf(path, tmp_path / "out")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("raydistill data: "), proc.stderr
    assert str(tmp_path / "in") in err[0] and all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "out").exists()
