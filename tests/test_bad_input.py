"""Bad input, stage by stage: each case gets a clear error that names the file, row or field and
says what to do, or a flagged row, or a recovery that keeps what was already computed.

Configs (sweep, annotate, train), data files (Parquet and the JSON mirror), teacher replies
(through the local OpenAI-compatible test server, on a local Ray cluster), model folders, and
resume state (request cache, evaluation parts, checkpoint state, annotation folders).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openai_server import ServerProcess
from raydistill import annotate as A
from raydistill import datasets, prompts
from raydistill.datasets import DataUnavailable, MalformedData
from raydistill.spec import SpecError, load_sweep
from raydistill.students import StudentError, get_student, resolve_student
from raydistill.train import TrainInputError, TrainJob, fit, read_examples, read_train_state

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ["RAYDISTILL_DATA_DIR"])


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# ============================================================================ sweep YAML

SWEEP = "name: t\ndatasets: [svamp]\nteachers: [chatgpt]\nlevels: [1]\nstudents: [tiny-llama]\n"


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param(SWEEP + "trian: {epochs: 1}\n", ["trian", "did you mean 'train'", "allowed here"], id="unknown-field"),
        pytest.param(SWEEP + "train: {epochs: many}\n", ["train.epochs", "number"], id="wrong-type"),
        pytest.param(SWEEP.replace("[svamp]", "[svampp]"), ["datasets", "svampp", "choose from"],
                     id="unknown-dataset"),
        pytest.param(SWEEP + "formats: [poem]\n", ["formats", "poem", "choose from"], id="unknown-format"),
        pytest.param(SWEEP.replace("levels: [1]", "levels: [7]"), ["levels", "1 to 6", "[7]"], id="level-7"),
        pytest.param(SWEEP + "train: {global_batch_size: 10, micro_batch_size: 4}\n",
                     ["global_batch_size 10", "multiple of"], id="batch-not-divisible"),
        pytest.param("- svamp\n- gsm8k\n", ["mapping of fields", "list"], id="not-a-mapping"),
        pytest.param(SWEEP + "checkpoint_storage: s3://AKIAXXXX:hunter2@bucket/ckpt\n",
                     ["checkpoint_storage", "holds credentials", "environment"], id="credentials-in-storage-uri"),
        pytest.param(SWEEP + "checkpoint_storage: /mnt/ckpt\n", ["checkpoint_storage", "object-storage URI"],
                     id="local-checkpoint-storage"),
    ],
)
def test_sweep_yaml_errors_name_the_file_and_field(tmp_path, text, words):
    path = _write(tmp_path / "sweep.yaml", text)
    with pytest.raises(SpecError) as err:
        load_sweep(path)
    message = _one_line(str(err.value))
    assert message.startswith(f"{path}:")
    for word in words:
        assert word in message


def test_sweep_yaml_unreadable_names_the_file(tmp_path):
    path = _write(tmp_path / "sweep.yaml", "name: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_sweep(path)
    message = _one_line(str(err.value))
    assert message.startswith(f"{path}: not valid YAML") and "line 2" in message


def test_sweep_yaml_missing_file_names_it(tmp_path):
    with pytest.raises(SpecError) as err:
        load_sweep(tmp_path / "nope.yaml")
    message = _one_line(str(err.value))
    assert str(tmp_path / "nope.yaml") in message and "no such file" in message and "--config" in message


# ============================================================================ annotate YAML

ANNOTATE = "output_dir: out\nteacher: {model: openai/gpt-4o}\n"


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param("output_dir: out\nteacher: {model: openai/gpt-4o, api_key: sk-live-123456}\n"
                     "grid: {tasks: [svamp]}\n", ["teacher", "never read from a config", "api_key_env"],
                     id="api-key-in-config"),
        pytest.param(ANNOTATE + "cells: [{task: svampp, level: 1}]\n", ["cells.0.task", "'svampp'", "known tasks: svamp"],
                     id="unknown-task"),
        pytest.param(ANNOTATE + "cells: [{task: svamp, level: 2, hybrid: {by: question_length}}]\n",
                     ["exactly one of level (1-6) and hybrid"], id="level-and-hybrid"),
        pytest.param(ANNOTATE + "cells: [{task: svamp}]\n", ["exactly one of level (1-6) and hybrid"],
                     id="neither-level-nor-hybrid"),
        pytest.param(ANNOTATE + "cells: [{task: svamp, level: 3, pad: {to_level: 3}}]\n",
                     ["pad.to_level must differ from level"], id="pad-to-same-level"),
        pytest.param(ANNOTATE + "grid: {tasks: [svamp]}\nruntime: {concurrancy: 8}\n",
                     ["runtime.concurrancy", "Extra inputs"], id="unknown-field"),
        pytest.param(ANNOTATE + "grid: {tasks: [svamp]}\nquestions: {source: parquet}\n",
                     ["questions.source=parquet needs questions.path"], id="parquet-without-path"),
        pytest.param("- output_dir\n", ["top level must be a mapping", "list"], id="not-a-mapping"),
        pytest.param("output_dir: [\n", ["not valid YAML"], id="unreadable-yaml"),
    ],
)
def test_annotate_yaml_errors_name_the_file_and_field(tmp_path, text, words):
    path = _write(tmp_path / "annotate.yaml", text)
    with pytest.raises(SpecError) as err:
        A.load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:")
    for word in words:
        assert word in message
    assert "sk-live-123456" not in message


def test_annotate_yaml_missing_file_says_to_check_the_path(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: no such file; check the path given to --config"):
        A.load_config(tmp_path / "nope.yaml")
    assert A.main(["--config", str(tmp_path / "nope.yaml")]) == 2  # the CLI prints it, no traceback


# ============================================================================ train config


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param(None, ["no such file", "--config"], id="missing-file"),
        pytest.param("epochs: [1\n", ["cannot read the train config"], id="unreadable-yaml"),
        pytest.param("- epochs\n", ["mapping of TrainSpec fields", "list"], id="not-a-mapping"),
        pytest.param("trian_epochs: 1\n", ["train.trian_epochs", "Extra inputs"], id="unknown-field"),
        pytest.param("micro_batch_size: many\n", ["train.micro_batch_size", "integer"], id="wrong-type"),
    ],
)
def test_train_config_errors_name_the_file_and_field(tmp_path, capsys, text, words):
    from raydistill.train import main

    config = tmp_path / "train.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["--student", "tiny-llama", "--data", "x.parquet", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(config) in err
    for word in words:
        assert word in err


# ============================================================================ training Parquet


def _examples(questions: list, rationales: list) -> pa.Table:
    return pa.table({"question": questions, "rationale": rationales})


def _cut_parquet(table: pa.Table) -> bytes:
    """A real Parquet file of several row groups, cut in the middle (a copy that stopped half way)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables([table] * 200), sink, row_group_size=100)
    data = sink.getvalue().to_pybytes()
    return data[: len(data) // 2]


_QUESTIONS = ["How many apples?", "How many pears?", "How many apples?"]


@pytest.mark.parametrize(
    "content, words",
    [
        pytest.param(pa.table({"question": ["q"], "answer": ["1"]}), ["missing columns ['rationale']", "EXAMPLE_SCHEMA"],
                     id="missing-column"),
        pytest.param(pa.table({"question": ["q"], "rationale": [7]}), ["'rationale' has type int64", "as text"],
                     id="wrong-type"),
        pytest.param(b"", ["not a readable Parquet file", "write it again"], id="empty-file"),
        pytest.param(b"PAR1\x00\x13garbage\xff\xfe" * 40, ["not a readable Parquet file", "delete it"],
                     id="corrupt-bytes"),
        pytest.param(_examples(["q1", "  ", "q3"], ["r1", "r2", ""]), ["rows [1, 2]", "empty question or rationale",
                                                                        "remove or fill them"],
                     id="empty-question-and-rationale"),
        pytest.param(_examples([], []).cast(pa.schema([("question", pa.string()), ("rationale", pa.string())])),
                     ["no rows to train on"], id="no-rows"),
        pytest.param(None, ["no such training file", "--data"], id="missing-file"),
        pytest.param(_cut_parquet(_examples(["q"], ["r"])), ["not a readable Parquet file", "write it again"],
                     id="cut-mid-row-group"),
        pytest.param(pa.table({"question_id": ["a", "b", "a"], "question": _QUESTIONS, "rationale": ["r"] * 3,
                               "answer": ["3", "4", "5"]}),
                     ["rows 0 and 2", "question_id a", "different answers ('3' and '5')", "keep the right one"],
                     id="duplicate-id-different-answers"),
        pytest.param(pa.table({"question": ["q1", "q2"], "rationale": ["r", "r"], "answer": ["1", None]}),
                     ["rows [1] have no answer", "fill or remove them"], id="null-answer"),
        pytest.param(pa.table({"question": ["q1"], "rationale": ["r"], "answer": [["1", "2"]]}),
                     ["column 'answer' has type list<", "one answer per row"], id="list-answer"),
    ],
)
def test_training_parquet_errors_name_the_file(tmp_path, content, words):
    path = tmp_path / "train.parquet"
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(TrainInputError) as err:
        read_examples(path)
    message = _one_line(str(err.value))
    assert message.startswith(f"{path}:")
    for word in words:
        assert word in message


def test_fit_checks_the_training_file_before_starting_workers(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["q"]}), path)
    job = TrainJob(student="tiny-llama", model_path="unused", data_path=str(path), run_name="r",
                   storage_path=str(tmp_path), spec={})
    with pytest.raises(TrainInputError, match=r"train\.parquet: missing columns \['rationale'\]"):
        fit(job)
    assert not (tmp_path / "r").exists()  # nothing started


@pytest.mark.parametrize("storage, words", [
    pytest.param("foo://bucket/runs", ["'foo://bucket/runs'", "unknown scheme 'foo'", "s3://bucket/prefix"],
                 id="unknown-scheme"),
    pytest.param("s3://", ["'s3://'", "names no bucket"], id="no-bucket"),
    pytest.param("s3://bucket/runs?endpoint=x", ["Unexpected query parameter", "'endpoint'"], id="bad-query-option"),
    pytest.param("s3://AKIAXXXX:hunter2@bucket/runs", ["holds credentials", "AWS_ACCESS_KEY_ID"], id="credentials"),
])
def test_fit_checks_the_checkpoint_storage_before_starting_workers(tmp_path, storage, words):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["q"], "rationale": ["r"]}), path)
    job = TrainJob(student="tiny-llama", model_path="unused", data_path=str(path), run_name="r",
                   storage_path=storage, spec={})
    with pytest.raises(TrainInputError) as err:
        fit(job)
    for word in words:
        assert word in str(err.value)
    assert "hunter2" not in str(err.value)


def test_train_cli_refuses_credentials_in_the_storage_uri_without_echoing_them(tmp_path, capsys):
    from raydistill.train import main

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["q"], "rationale": ["r"]}), path)
    with pytest.raises(SystemExit) as exit_:
        main(["--student", "tiny-llama", "--data", str(path), "--out", "s3://AKIAXXXX:hunter2@bucket/runs"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint storage 's3://***@bucket/runs'" in err and "holds credentials" in err
    assert "hunter2" not in err and "Traceback" not in err


# ============================================================================ annotation questions Parquet


@pytest.mark.parametrize(
    "content, words",
    [
        pytest.param(pa.table({"question": ["q"]}), ["missing columns ['answer']", "question and answer columns"],
                     id="missing-column"),
        pytest.param(pa.table({"question": [1, 2], "answer": ["1", "2"]}), ["'question' has type int64",
                                                                          "write it as text"], id="wrong-type"),
        pytest.param(b"", ["not a readable Parquet file", "pyarrow.parquet.write_table"], id="empty-file"),
        pytest.param(b"\x00\x01not parquet at all\xff" * 30, ["not a readable Parquet file"], id="corrupt-bytes"),
        pytest.param(pa.table({"question": ["a?", None, " "], "answer": ["1", "2", "3"]}),
                     ["rows [1, 2] have an empty question", "remove or fill them"], id="empty-question"),
        pytest.param(None, ["no such file", "point questions.path at a Parquet file"], id="missing-file"),
        pytest.param(_cut_parquet(pa.table({"question": ["q"], "answer": ["1"]})), ["not a readable Parquet file"],
                     id="cut-mid-row-group"),
        pytest.param(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                     ["no rows", "nothing to annotate"], id="no-rows"),
        pytest.param(pa.table({"question": _QUESTIONS, "answer": ["3", "4", "5"]}),
                     ["rows 0 and 2 are the same question", "different answers ('3' and '5')"],
                     id="duplicate-question-different-answers"),
        pytest.param(pa.table({"question_id": ["a", "b", "a"], "question": ["x?", "y?", "z?"], "answer": [1, 2, 3]}),
                     ["rows 0 and 2", "question_id a", "('1' and '3')"], id="duplicate-id-different-answers"),
        pytest.param(pa.table({"question": ["a?", "b?", "c?"], "answer": ["1", None, " "]}),
                     ["rows [1, 2] have no answer", "fill or remove them"], id="null-answer"),
        pytest.param(pa.table({"question": ["a?"], "answer": [["1"]]}), ["column 'answer' has type list",
                                                                        "as text or a number"], id="list-answer"),
    ],
)
def test_annotation_questions_parquet_errors_name_the_file(tmp_path, content, words):
    path = tmp_path / "questions.parquet"
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        A.load_questions("svamp", A.QuestionsSpec(source="parquet", path=str(path)))
    message = _one_line(str(err.value))
    assert message.startswith(f"questions.path {path}:")
    for word in words:
        assert word in message


# ============================================================================ JSON files of the data mirror

STQA_TEST = "distilling-cot/test/strategyQA_test.json"
STQA_L1 = "distilling-cot/train/strategyQA_chatgpt_level_1_ranked.json"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_mirror(tmp_path, monkeypatch):
    """A mirror with StrategyQA's files only; downloads go to a closed local port."""
    root = tmp_path / "mirror"
    for rel in (datasets.DATASET_INFO, STQA_TEST, "distilling-cot/train/strategyQA_onlyans.json", STQA_L1):
        _write(root / rel, (MIRROR / rel).read_bytes())
    monkeypatch.setenv("RAYDISTILL_DATA_DIR", str(root))
    monkeypatch.setenv("RAYDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYDISTILL_DATA_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAYDISTILL_DOWNLOAD_TIMEOUT", "2")
    return root


@pytest.mark.parametrize(
    "content, words",
    [
        pytest.param(b"", ["is empty", "restore the upstream file"], id="empty-file"),
        pytest.param(b'[{"instruction": "a\xff\xfe?"}]', ["is not UTF-8 text", "restore the upstream file"],
                     id="corrupt-bytes"),
        pytest.param(b'[{"instruction": "a?", ', ["invalid JSON"], id="truncated-json"),
        pytest.param(b'[{"instruction": "a?", "label": "True"}, {"instruction": " ", "label": "False"}]',
                     ["row 1 has an empty question (column 'instruction')", "fix or remove that row"],
                     id="empty-question"),
        pytest.param(b'[{"instruction": "a?", "label": "True"}, {"instruction": "b?"}]',
                     ["row 1 has no column 'label'"], id="missing-column"),
        pytest.param(b'[{"instruction": "a?", "label": ["True"]}]', ["row 0 column 'label'", "not text"],
                     id="wrong-type"),
    ],
)
def test_bad_test_set_file_names_file_and_row(small_mirror, content, words):
    (small_mirror / STQA_TEST).write_bytes(content)
    with pytest.raises(MalformedData) as err:
        datasets.load_test("strategyqa")
    message = _one_line(str(err.value))
    assert message.startswith(f"{STQA_TEST}:")
    for word in words:
        assert word in message


def test_training_row_with_empty_answer_is_skipped_and_counted(small_mirror, caplog):
    rows = [{"instruction": "Is water wet?", "output": "Water is a liquid. The answer is True"},
            {"instruction": "Is fire cold?", "output": "   "}]
    (small_mirror / STQA_L1).write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="raydistill.datasets"):
        table = datasets.load_train("strategyqa", "chatgpt", 1)
    assert table.column("question").to_pylist() == ["Is water wet?"]
    assert f"{STQA_L1}: skipped 1 rows" in caplog.text and "row 1" in caplog.text


def test_mirror_missing_a_file_says_where_it_looked_and_what_to_do(small_mirror, tmp_path):
    (small_mirror / STQA_TEST).unlink()
    with pytest.raises(DataUnavailable) as err:
        datasets.load_test("strategyqa")
    message = _one_line(str(err.value))
    for word in (STQA_TEST, f"mirror {small_mirror}", f"cache {tmp_path / 'cache'}",
                 "set RAYDISTILL_DATA_DIR to a mirror that has it", "go online"):
        assert word in message


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'svampp'; known tasks: svamp, gsm8k, aqua"):
        datasets.load_test("svampp")


# ============================================================================ model paths


def test_unknown_student_name_lists_known_students_and_the_folder_option():
    with pytest.raises(StudentError) as err:
        resolve_student("bloom-7b")
    assert "unknown student 'bloom-7b'" in str(err.value) and "tiny-llama" in str(err.value)
    assert "local Hugging Face model folder" in str(err.value)


def test_folder_without_config_json_says_what_a_model_folder_holds(tmp_path):
    folder = tmp_path / "model"
    _write(folder / "model.safetensors", b"")
    with pytest.raises(StudentError, match=rf"^{folder} is not a Hugging Face model folder \(no config.json\); "
                                           "pass a folder written by save_pretrained"):
        resolve_student(folder)


def test_lora_adapter_without_base_info_names_the_adapter_config(tmp_path):
    from raydistill.evaluate import merged_model

    adapter = tmp_path / "adapter"
    _write(adapter / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(StudentError) as err:
        merged_model(adapter)
    message = _one_line(str(err.value))
    assert message.startswith(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path")
    assert "set it to the base model's folder or hub id" in message
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": ')  # cut short
    with pytest.raises(StudentError, match="unreadable adapter config .* save the adapter again"):
        merged_model(adapter)
    # given to the trainer as a student, the folder is recognised as an adapter
    with pytest.raises(StudentError, match="it holds a LoRA adapter"):
        resolve_student(adapter)


def test_damaged_student_info_file_names_it(tmp_path):
    folder = tmp_path / "model"
    _write(folder / "config.json", "{}")
    _write(folder / "raydistill_student.json", '{"name": "tiny')
    with pytest.raises(StudentError, match=r"raydistill_student.json: unreadable student info .*; delete it"):
        get_student(folder)


# ============================================================================ resume state: checkpoints


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param('{"step": 4, "history": [{"step": 1, "lo', ["unreadable checkpoint state"], id="cut-short"),
        pytest.param('{"step": 4}', ["incomplete checkpoint state", "step and history"], id="partial"),
        pytest.param(None, ["unreadable checkpoint state", "No such file"], id="missing"),
    ],
)
def test_bad_checkpoint_state_says_which_folder_to_delete(tmp_path, text, words):
    folder = tmp_path / "checkpoint_step0000004"
    folder.mkdir()
    if text is not None:
        (folder / "train_state.json").write_text(text)
    with pytest.raises(TrainInputError) as err:
        read_train_state(folder)
    message = _one_line(str(err.value))
    assert message.startswith(f"{folder / 'train_state.json'}:")
    assert f"delete the checkpoint folder {folder} to resume from the one before it" in message
    for word in words:
        assert word in message


def test_good_checkpoint_state_reads():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "train_state.json").write_text('{"step": 2, "history": [], "resumed_at": []}')
        assert read_train_state(tmp).step == 2


# ============================================================================ resume state: evaluation parts


class _ChatTokenizer:
    """Just what the 'chat' template needs."""

    chat_template = "chat"
    eos_token = "</s>"
    name_or_path = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"Q: {messages[0]['content']}\nA:"


def test_corrupt_evaluation_part_is_set_aside_and_only_its_questions_redone(tmp_path, monkeypatch, caplog):
    from raydistill.evaluate import run as E
    from raydistill.spec import EvalSpec

    questions = [f"What is {i} + {i}?" for i in range(6)]
    test = pa.table({"question_id": [f"q{i}" for i in range(6)], "question": questions,
                     "answer": [str(2 * i) for i in range(6)]})
    generated: list[list[str]] = []

    def fake_batches(prompts, *engine_args):
        generated.append([p["question_id"] for p in prompts])
        for i in range(0, len(prompts), 2):
            yield [{**p, "generation": f"The answer is {p['gold']}", "tokens_generated": 5, "truncated": False, "empty": False}
                   for p in prompts[i:i + 2]]

    monkeypatch.setattr(E, "generate_batches", fake_batches)
    monkeypatch.setattr(E, "model_digest", lambda path: "weights")
    monkeypatch.setattr(E, "load_tokenizer", lambda path, template: _ChatTokenizer())
    monkeypatch.setattr(E, "choose_engine", lambda spec: "hf")
    out = tmp_path / "svamp.parquet"
    spec = EvalSpec(engine="hf")
    E.evaluate("unused", "tiny-llama", "svamp", test, spec, out, progress=False)
    parts = sorted(E.parts_dir(out).glob("part-*.parquet"))
    assert len(parts) == 3
    broken = parts[1]
    lost = set(pq.read_table(broken)["question_id"].to_pylist())
    broken.write_bytes(broken.read_bytes()[:40])  # a part cut short
    kept = {p: p.stat().st_mtime_ns for p in parts if p != broken}

    with caplog.at_level(logging.WARNING, logger="raydistill.evaluate"):
        result = E.evaluate("unused", "tiny-llama", "svamp", test, spec, out, progress=False)
    assert set(generated[-1]) == lost  # only the damaged part's questions again
    assert result.n == 6 and result.accuracy == 1.0
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the good parts are untouched
    assert broken.with_name(broken.name + ".corrupt").exists() and not broken.exists()
    assert str(broken) in caplog.text and "generated again" in caplog.text


# ============================================================================ resume state: annotation folders


def _svamp_questions(tmp_path: Path, n: int, kinds: dict[int, str] | None = None) -> tuple[Path, list[str], list[str]]:
    qs = [f"Question {i}: A farmer has {i + 1} sheep and buys {2 * i + 3} more. How many sheep now?" for i in range(n)]
    golds = [str(3 * i + 4) for i in range(n)]
    path = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"question": qs, "answer": golds}), path)
    return path, qs, golds


def _key(spec: A.AnnotationSpec, question: str) -> str:
    msgs = prompts.build_messages(spec.task, spec.level, spec.format, question, spec.prompt_dir)
    return A.request_key(spec.teacher.model, msgs, spec.teacher.sampling_params())


def _record(key: str, response: str) -> str:
    return json.dumps({"key": key, "model": "openai/mock-teacher", "response": response, "tokens_in": 10,
                       "tokens_out": 5, "cost_usd": 0.0, "latency_s": 0.1, "finish_reason": "stop"}) + "\n"


@pytest.mark.parametrize("old_summary, aside_prefix", [
    pytest.param(json.dumps({"complete": True, "cell_hash": "f" * 64, "result": {}}), "f" * 16, id="other-cell-hash"),
    pytest.param('{"complete": true, "cell_ha', "damaged-summary", id="damaged-summary"),
])
def test_annotation_folder_of_another_cell_is_set_aside_not_overwritten(tmp_path, old_summary, aside_prefix,
                                                                         caplog):
    qpath, qs, golds = _svamp_questions(tmp_path, 2)
    spec = A.AnnotationSpec(task="svamp", level=1, teacher={"model": "openai/mock-teacher"},
                            questions={"source": "parquet", "path": str(qpath)},
                            runtime={"cache_dir": str(tmp_path / "cache"), "progress": False})
    # every request is cached, so the cell runs without Ray or a server
    _write(tmp_path / "cache" / "a.jsonl", "".join(_record(_key(spec, q), f"So. The answer is {g}")
                                                   for q, g in zip(qs, golds)))
    out = tmp_path / "cell"
    _write(out / "summary.json", old_summary)
    _write(out / "annotations.parquet", b"the other cell's annotations")
    with caplog.at_level(logging.WARNING, logger="raydistill.annotate"):
        result = A.annotate(spec, out)
    assert result.rows == 2 and result.cache_hits == 2 and result.teacher_accuracy == 1.0
    (aside,) = (out / "superseded").iterdir()
    assert aside.name.startswith(aside_prefix + "-")
    assert (aside / "annotations.parquet").read_bytes() == b"the other cell's annotations"
    assert (aside / "summary.json").read_text() == old_summary
    assert json.loads((out / "summary.json").read_text())["cell_hash"] == spec.cell_hash()
    assert str(aside) in caplog.text
    assert A.annotate(spec, out).reused  # the folder is now this cell's


# ============================================================================ teacher replies and the request cache (Ray)

REPLY_KINDS = {0: "empty", 1: "noanswer", 2: "badjson", 3: "400", 4: "500"}
CACHED, CUT_SHORT, INCOMPLETE = (5, 6, 7), 8, 9
MAX_ATTEMPTS = 2
KEY_ENV = "RAYDISTILL_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """One annotation run over ten questions: five get a bad reply (REPLY_KINDS), three are in the
    request cache, one cache line was cut short by a crash and one lacks its response."""
    import ray

    tmp = tmp_path_factory.mktemp("teacher")
    qpath, qs, golds = _svamp_questions(tmp, 10)
    kinds = {qs[i]: k for i, k in REPLY_KINDS.items()}
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), KEY_ENV: "sk-test-key"}})
    try:
        with ServerProcess(tmp / "srv", answers=dict(zip(qs, golds)), kinds_by_question=kinds) as server:
            spec = A.AnnotationSpec(
                task="svamp", level=1,
                teacher={"model": "openai/mock-teacher", "api_base": server.base_url, "api_key_env": KEY_ENV,
                         "timeout_s": 10},
                questions={"source": "parquet", "path": str(qpath)},
                runtime={"concurrency": 4, "num_actors": 1, "batch_size": 4, "max_attempts": MAX_ATTEMPTS,
                         "backoff_base_s": 0.01, "backoff_max_s": 0.05, "num_cpus_per_actor": 0.5,
                         "cache_dir": str(tmp / "cache"), "progress": False},
            )
            keys = [_key(spec, q) for q in qs]
            shard = "".join(_record(keys[i], f"Cached reply {i}. The answer is {golds[i]}") for i in CACHED[:2])
            shard += "this line is not JSON\n"
            shard += json.dumps({"key": keys[INCOMPLETE], "model": "openai/mock-teacher"}) + "\n"
            shard += _record(keys[CACHED[2]], f"Cached reply {CACHED[2]}. The answer is {golds[CACHED[2]]}")
            shard += _record(keys[CUT_SHORT], "lost")[:60]  # the write a crash interrupted
            _write(tmp / "cache" / "crashed-writer.jsonl", shard)
            result = A.annotate(spec, tmp / "cell")
            log = server.log_entries()
    finally:
        ray.shutdown()
    rows = {r["question"]: r for r in pq.read_table(result.annotations_path).to_pylist()}
    examples = set(pq.read_table(result.examples_path)["question"].to_pylist())
    return {"result": result, "rows": rows, "examples": examples, "log": log, "qs": qs, "golds": golds,
            "keys": keys, "cache": tmp / "cache"}


def test_no_question_is_dropped(teacher_run):
    assert teacher_run["result"].rows == 10 and set(teacher_run["rows"]) == set(teacher_run["qs"])


@pytest.mark.parametrize(
    "qidx, error, attempts",
    [
        pytest.param(0, "empty response", 1, id="empty-content"),
        pytest.param(2, "after", MAX_ATTEMPTS, id="malformed-json-body"),
        pytest.param(3, "(HTTP 400) after 1 attempt(s)", 1, id="http-400-not-retried"),
        pytest.param(4, f"(HTTP 500) after {MAX_ATTEMPTS} attempt(s)", MAX_ATTEMPTS, id="persistent-500"),
    ],
)
def test_failed_teacher_reply_is_a_flagged_row(teacher_run, qidx, error, attempts):
    q = teacher_run["qs"][qidx]
    row = teacher_run["rows"][q]
    assert row["error"] is not None and error in row["error"], row["error"]
    assert row["correct"] is None and row["gold"] == teacher_run["golds"][qidx]
    assert q not in teacher_run["examples"]  # a failed row never becomes training data
    sent = [e for e in teacher_run["log"] if e["question"] == q]
    if REPLY_KINDS[qidx] != "badjson":  # a client may or may not retry a body it cannot parse
        assert len(sent) == attempts


def test_reply_without_the_answer_sentence_is_graded_unparsed(teacher_run):
    row = teacher_run["rows"][teacher_run["qs"][1]]
    assert row["error"] is None and row["response"] == "I cannot tell from what is given."
    assert row["extracted"] is None and row["correct"] is False


def test_damaged_cache_lines_are_skipped_and_only_their_requests_resent(teacher_run):
    sent = {e["question"] for e in teacher_run["log"]}
    for i in CACHED:  # the good lines, before and after the damaged ones, are served from the cache
        q = teacher_run["qs"][i]
        assert q not in sent
        assert teacher_run["rows"][q]["response"] == f"Cached reply {i}. The answer is {teacher_run['golds'][i]}"
    for i in (CUT_SHORT, INCOMPLETE):
        q = teacher_run["qs"][i]
        assert [e["kind"] for e in teacher_run["log"] if e["question"] == q] == ["ok"]
        assert teacher_run["rows"][q]["correct"] is True
    assert teacher_run["result"].cache_hits == len(CACHED)
    # the shard is left as it was (append-only); the resent replies went to a new shard
    assert set(A.RequestCache(teacher_run["cache"]).load()) >= {teacher_run["keys"][i] for i in
                                                                 (*CACHED, CUT_SHORT, INCOMPLETE)}


# ============================================================================ sweep resume state


@pytest.mark.parametrize("content", ['{"trial_hash": "abc", "metr', '[1, 2]', '{"axes": {}}'],
                         ids=["cut-short", "not-an-object", "no-metrics"])
def test_damaged_trial_record_is_set_aside_and_the_trial_reruns(tmp_path, content):
    from raydistill.sweep import read_record

    path = _write(tmp_path / "trials" / "abc" / "record.json", content)
    assert read_record(path) is None  # the trial runs again
    assert not path.exists() and (path.parent / "record.json.corrupt").read_text() == content
    record = {"trial_hash": "abc", "axes": {"level": "1"}, "metrics": {"accuracy": 0.5}}
    good = _write(path, json.dumps(record))
    assert read_record(good).model_dump(exclude_unset=True) == record


def test_damaged_cell_parquet_is_written_again(tmp_path):
    from raydistill.spec import CellSpec
    from raydistill.sweep import replay_cell

    cell = CellSpec(dataset="svamp", teacher="chatgpt", level=1, train_limit=5)
    info = replay_cell(cell, tmp_path / "cell")
    path = Path(info["train_path"])
    rows = pq.read_table(path).to_pylist()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a crash mid-copy
    replay_cell(cell, tmp_path / "cell")
    assert pq.read_table(path).to_pylist() == rows


@pytest.mark.parametrize("item, words", [("train.epochs", ["KEY=VALUE", "train.epochs"]),
                                         ("=3", ["KEY=VALUE"]),
                                         ("levels=[1, 2", ["levels=[1, 2", "not valid YAML"])])
def test_bad_set_override_is_one_line(item, words):
    from raydistill.spec import parse_overrides

    with pytest.raises(SpecError) as err:
        parse_overrides([item])
    message = _one_line(str(err.value))
    for word in words:
        assert word in message


def test_sweep_cli_reports_a_bad_override_without_a_traceback(capsys):
    from raydistill.sweep import main

    assert main(["--config", "sweeps/granularity.yaml", "--set", "train.epochs"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["sweeps/granularity.py", "sweeps/teacher.py"])
def test_sweep_script_with_an_unknown_student_fails_in_one_line_before_anything_runs(script, tmp_path):
    """`python sweeps/<name>.py --set students=[gpt-5]` as a user types it: the student is checked
    with the config, one line, exit 2, nothing written."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, script, "--set", "students=[gpt-5]", "--output-dir", str(tmp_path / "o")],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "field 'students'" in line and "unknown student 'gpt-5'" in line and "tiny-llama" in line
    assert not (tmp_path / "o").exists()


def test_sweep_cli_prints_an_unavailable_data_file_in_one_line(small_mirror, tmp_path, capsys):
    """A sweep over a dataset the mirror lacks: the data error's own line, no traceback."""
    from raydistill.sweep import main

    config = tmp_path / "s.yaml"
    config.write_text("name: s\ndatasets: [svamp]\nteachers: [chatgpt]\nlevels: [1]\nstudents: [tiny-llama]\n")
    assert main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "SVAMP" in err[0] and "RAYDISTILL_DATA_DIR" in err[0], err[-5:]


def test_make_test_vllm_fails_in_one_line_where_vllm_does_not_import(tmp_path):
    """`make test-vllm` against an environment without vLLM (here: .venv's Python) stops before
    pytest, whose vLLM tests would all skip and pass, with a line saying how to rebuild it."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv-without-vllm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed").touch()
    plain = os.path.relpath(Path(sys.executable).parents[1], repo)  # this environment stays as it is
    out = subprocess.run([shutil.which("make") or "make", "-o", f"{plain}/.installed", "-o", f"{venv}/.installed",
                          "test-vllm", f"VENV={plain}", f"VLLM_VENV={venv}"],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"make test-vllm: vLLM does not import in {venv}" in out.stderr and "make install-vllm" in out.stderr
    assert "pytest" not in out.stdout and "skipped" not in out.stdout
