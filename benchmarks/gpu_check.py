"""A GPU check that needs only torch, transformers, peft and accelerate (docs/cluster.md, "The
torch-only GPU check").

It runs where raydistill's full install cannot (yet): one GPU, no network, no Ray, DeepSpeed,
vLLM, pyarrow, pydantic or litellm, from a copy of the three files in `FILES` (it loads
raydistill/memory.py and raydistill/tiny_llama.py by path, never the raydistill package). Its
checks, in order:

* environment: versions, the GPU and whether it has bf16;
* build: a 4-layer Llama (hidden 512) from a config, with a byte-level BPE tokenizer trained on
  the spot (tiny_llama's), SDPA attention;
* full_finetune, lora: 4 AdamW steps on one batch of the tokenizer's corpus, all weights or a
  peft LoRA (r 8, all linear layers) on the frozen base, in bf16 (fp32 on CPU) with non-reentrant
  gradient checkpointing. The same batch each step, so the loss must fall (the model memorises
  it). SDPA is the attention that runs: `scaled_dot_product_attention` is called twice per layer
  and step, in the forward and again in the checkpointed layer's recomputation during backward;
* generation_greedy, generation_beam: HF `generate` on the fine-tuned model (KV cache on), 3
  left-padded prompts: greedy with 32 new tokens, beam search with 5 beams returning 5 sequences
  per prompt with 16 new tokens; every row has at most the new tokens asked for, stops early only
  at EOS, and beam search returns 5 distinct sequences a prompt, best score first;
* memory: raydistill.memory's estimate beside the measured peak at two micro-batch x sequence
  sizes. On the GPU, like `benchmarks/memory.py --device cuda`: one forward and backward, measured
  by `torch.cuda.max_memory_allocated`, beside the estimate's weights + gradients + activations +
  logits (plain torch keeps no DeepSpeed optimizer state, the allocator sees no CUDA context). On
  CPU, like `benchmarks/memory.py`: two AdamW steps in a fresh process, the growth of the resident
  high-water mark plus the weights, beside the whole estimate (device "cpu"). Passes when the
  estimate is at least the measurement;
* self_contained: none of ray, deepspeed, vllm, raydistill, pyarrow, pydantic, litellm was imported.

stdout carries one JSON object (versions, every check's figures and `passed`), everything else
goes to stderr; the exit status is 1 when a check failed.

    python benchmarks/gpu_check.py                                    # the GPU
    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check-h100.json
    python benchmarks/gpu_check.py --device cpu                       # the CPU twin (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("benchmarks/gpu_check.py", "raydistill/memory.py", "raydistill/tiny_llama.py")  # all it reads
NOT_NEEDED = ("ray", "deepspeed", "vllm", "raydistill", "pyarrow", "pydantic", "litellm")
STUDENT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True)
TRAIN_BATCH, TRAIN_SEQ, TRAIN_STEPS, LEARNING_RATE = 4, 128, 4, 1e-3
MEMORY_CASES = {"cuda": [(8, 1024), (4, 4096)], "cpu": [(2, 512), (4, 1024)]}  # (micro-batch, sequence length)
PROMPTS = ("Tom has 12 apples and buys 7 more. How many apples are there now?",
           "The train leaves the station at noon",
           "Which of the following is true?")
GREEDY_NEW_TOKENS, BEAM_NEW_TOKENS, NUM_BEAMS = 32, 16, 5

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; say so loudly if something tries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def load_by_path(relative: str):
    """A module of this checkout loaded from its file, without importing the raydistill package."""
    name = "gpu_check_" + Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def json_stdout():
    """Yield a writer to the real stdout; meanwhile file descriptor 1 (Python's and C libraries'
    prints) goes to stderr, so that stdout holds the JSON alone."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(real), "w") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing of every decoder layer, as raydistill's training does
    (transformers 5.2x renamed it activation checkpointing; 5.17 has only the old name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class SdpaCounter:
    """Counts calls of torch's scaled_dot_product_attention (transformers' SDPA path calls it as
    `torch.nn.functional.scaled_dot_product_attention`; eager attention never does)."""

    def __init__(self):
        import torch

        self.calls, self._functional = 0, torch.nn.functional

    def __enter__(self):
        original = self._original = self._functional.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self._functional.scaled_dot_product_attention = counted
        return self

    def __exit__(self, *exc):
        self._functional.scaled_dot_product_attention = self._original


class Check:
    def __init__(self, device: str):
        import torch

        self.device, self.torch = device, torch
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.precision = "bf16" if device == "cuda" else "fp32"
        self.tiny = load_by_path("raydistill/tiny_llama.py")
        self.memory = load_by_path("raydistill/memory.py")
        self.tokenizer = self.config = self.trained = None

    # ------------------------------------------------------------------ checks

    def environment(self) -> dict:
        import accelerate
        import peft
        import tokenizers
        import transformers

        torch = self.torch
        cuda = torch.cuda.is_available()
        out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "accelerate": accelerate.__version__, "tokenizers": tokenizers.__version__,
               "cuda": torch.version.cuda, "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
               "gpu": torch.cuda.get_device_name(0) if cuda else None,
               "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
               "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
               "bf16": torch.cuda.is_bf16_supported() if cuda else None, "precision": self.precision}
        out["passed"] = bool(cuda and out["bf16"]) if self.device == "cuda" else True
        if self.device == "cuda" and not out["passed"]:
            out["error"] = "no CUDA device with bf16 (--device cpu runs the CPU twin)"
        return out

    def build(self) -> dict:
        from transformers import LlamaConfig

        self.tokenizer = self.tiny._train_tiny_tokenizer()
        self.tokenizer.padding_side = "left"
        tok = self.tokenizer
        self.config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **STUDENT)
        model = self.new_model()
        text = PROMPTS[0]
        out = {"config": {**STUDENT, "vocab_size": self.config.vocab_size},
               "parameters": sum(p.numel() for p in model.parameters()),
               "parameters_from_config": self.memory.Shape.of(self.config).parameters(),
               "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "attn_implementation": model.config._attn_implementation,
               "gradient_checkpointing": checkpointing_on(model),
               "tokenizer_roundtrip": tok.decode(tok(text)["input_ids"]) == text}
        out["passed"] = (out["attn_implementation"] == "sdpa" and out["gradient_checkpointing"]
                         and out["tokenizer_roundtrip"] and out["parameters"] == out["parameters_from_config"])
        return out

    def full_finetune(self) -> dict:
        model = self.new_model()
        out = self.train(model, model.parameters())
        out["passed"] = out.pop("ok") and out["trainable_parameters"] == out["parameters"]
        self.trained = model
        return out

    def lora(self) -> dict:
        from peft import LoraConfig, get_peft_model

        base = self.new_model()
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapters_before = {n: p.detach().clone() for n, p in trainable.items()}
        out = self.train(model, trainable.values())
        out["trainable_names_all_lora"] = all("lora_" in n for n in trainable)
        out["adapter_tensors"] = len(trainable)
        out["adapter_tensors_changed"] = sum(not self.torch.equal(p, adapters_before[n]) for n, p in trainable.items())
        out["base_unchanged"] = all(self.torch.equal(p, frozen[n]) for n, p in model.named_parameters()
                                    if n in frozen)
        out["adapter_dtype"] = str(next(iter(trainable.values())).dtype).removeprefix("torch.")
        out["passed"] = (out.pop("ok") and out["trainable_names_all_lora"] and out["base_unchanged"]
                         and 0 < out["trainable_parameters"] < out["parameters"]
                         and out["adapter_tensors_changed"] == out["adapter_tensors"])
        return out

    def memory_check(self) -> dict:
        cases = MEMORY_CASES[self.device]
        rows = self.measure_cuda(cases) if self.device == "cuda" else measure_cpu(self.config.to_dict(), cases)
        for row in rows:
            est = self.memory.estimate_training_memory(
                self.config, micro_batch_size=row["micro_batch"], seq_len=row["seq_len"], precision=self.precision,
                zero_stage=0, world_size=1, gradient_checkpointing=True, attn_implementation="sdpa",
                device=self.device)
            row["estimate_pieces"] = est.__dict__
            row["estimate_total"] = est.total()
            # On the GPU no optimizer step and no CUDA context (see the module docstring).
            row["estimate"] = (est.parameters + est.gradients + est.activations + est.logits
                               if self.device == "cuda" else est.total())
            row["ratio"] = None if row["measured"] is None else round(row["measured"] / row["estimate"], 3)
            row["passed"] = row["measured"] is None or row["measured"] <= row["estimate"]
            log(f"memory {row['micro_batch']}x{row['seq_len']}: measured "
                f"{'-' if row['measured'] is None else round(row['measured'] / 2**20)} MiB, "
                f"estimate {round(row['estimate'] / 2**20)} MiB")
        what = ("torch.cuda.max_memory_allocated of one forward+backward vs estimate parameters+gradients+"
                "activations+logits" if self.device == "cuda" else
                "resident high-water growth + weights of two AdamW steps vs the whole estimate (device cpu)")
        return {"measured_as": what, "cases": rows, "passed": all(r["passed"] for r in rows)}

    def generation_greedy(self) -> dict:
        model, batch = self.for_generation()
        with self.torch.no_grad(), SdpaCounter() as sdpa:
            ids = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=GREEDY_NEW_TOKENS)
        new = self.new_token_counts(ids[:, batch["input_ids"].shape[1]:], GREEDY_NEW_TOKENS)
        out = {"prompts": len(PROMPTS), "max_new_tokens": GREEDY_NEW_TOKENS, "prompt_tokens": batch["input_ids"].shape[1],
               "sequences": ids.shape[0], "new_tokens": [n for n, _ in new], "ended_at_eos": [e for _, e in new],
               "sdpa_calls": sdpa.calls,
               "text": self.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)}
        out["passed"] = ids.shape[0] == len(PROMPTS) and all(n == GREEDY_NEW_TOKENS or e for n, e in new) \
            and sdpa.calls > 0
        return out

    def generation_beam(self) -> dict:
        model, batch = self.for_generation()
        with self.torch.no_grad():
            res = model.generate(**batch, do_sample=False, num_beams=NUM_BEAMS, num_return_sequences=NUM_BEAMS,
                                 max_new_tokens=BEAM_NEW_TOKENS, return_dict_in_generate=True, output_scores=True)
        prompt_len = batch["input_ids"].shape[1]
        seqs, scores = res.sequences, res.sequences_scores.float().tolist()
        new = self.new_token_counts(seqs[:, prompt_len:], BEAM_NEW_TOKENS)
        per_prompt = [list(range(i * NUM_BEAMS, (i + 1) * NUM_BEAMS)) for i in range(len(PROMPTS))]
        distinct = [len({tuple(seqs[j].tolist()) for j in rows}) for rows in per_prompt]
        best_first = [all(scores[a] >= scores[b] for a, b in zip(rows, rows[1:])) for rows in per_prompt]
        out = {"prompts": len(PROMPTS), "num_beams": NUM_BEAMS, "num_return_sequences": NUM_BEAMS,
               "max_new_tokens": BEAM_NEW_TOKENS, "sequences": seqs.shape[0], "new_tokens": [n for n, _ in new],
               "ended_at_eos": [e for _, e in new], "distinct_per_prompt": distinct, "best_first": best_first,
               "scores": [round(s, 4) for s in scores], "finite_scores": all(math.isfinite(s) for s in scores)}
        out["passed"] = (seqs.shape[0] == NUM_BEAMS * len(PROMPTS) and all(n == BEAM_NEW_TOKENS or e for n, e in new)
                         and distinct == [NUM_BEAMS] * len(PROMPTS) and all(best_first) and out["finite_scores"])
        return out

    def self_contained(self) -> dict:
        loaded = sorted(name for name in NOT_NEEDED if sys.modules.get(name) is not None)
        return {"not_needed": list(NOT_NEEDED), "imported": loaded, "passed": not loaded}

    # ------------------------------------------------------------------ helpers

    def new_model(self):
        """The student from its config (seed 0) on the device, SDPA, gradient checkpointing on."""
        from transformers import AutoModelForCausalLM

        self.torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(self.config, attn_implementation="sdpa", dtype=self.dtype)
        model.to(self.device)
        model.config.use_cache = False
        enable_checkpointing(model)
        model.train()
        return model

    def batch(self, micro_batch: int, seq_len: int):
        """`micro_batch` rows of `seq_len` tokens of the tokenizer's corpus, lines joined by EOS."""
        ids = []
        for line in self.tiny._tiny_corpus():
            ids += self.tokenizer(line)["input_ids"] + [self.tokenizer.eos_token_id]
            if len(ids) >= micro_batch * seq_len:
                break
        return self.torch.tensor(ids[:micro_batch * seq_len], device=self.device).view(micro_batch, seq_len)

    def train(self, model, parameters) -> dict:
        """TRAIN_STEPS AdamW steps on one batch; losses, SDPA calls per step, and the trainable count."""
        torch = self.torch
        parameters = list(parameters)
        optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
        ids = self.batch(TRAIN_BATCH, TRAIN_SEQ)
        losses, calls, with_grad = [], [], 0
        for step in range(TRAIN_STEPS):
            with SdpaCounter() as sdpa:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            if step == 0:  # LoRA's A gets a zero gradient at first (B starts at zero), but a gradient
                with_grad = sum(p.grad is not None for p in parameters)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            calls.append(sdpa.calls)
        layers = self.config.num_hidden_layers
        out = {"steps": TRAIN_STEPS, "tokens_per_step": TRAIN_BATCH * TRAIN_SEQ, "learning_rate": LEARNING_RATE,
               "dtype": str(next(iter(parameters)).dtype).removeprefix("torch."),
               "base_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
               "losses": [round(x, 4) for x in losses], "finite": all(math.isfinite(x) for x in losses),
               "loss_fell": losses[-1] < losses[0],
               "attn_implementation": model.config._attn_implementation,
               "gradient_checkpointing": checkpointing_on(model),
               "sdpa_calls_per_step": calls, "sdpa_calls_expected": 2 * layers,
               "parameters": sum(p.numel() for p in model.parameters()),
               "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
               "tensors_with_gradient": with_grad, "trainable_tensors": len(parameters)}
        out["ok"] = (out["finite"] and out["loss_fell"] and out["attn_implementation"] == "sdpa"
                     and out["gradient_checkpointing"] and calls == [2 * layers] * TRAIN_STEPS
                     and with_grad == len(parameters))
        return out

    def measure_cuda(self, cases) -> list[dict]:
        torch = self.torch
        self.trained = None  # generation is done: nothing but this model on the GPU
        gc.collect()
        model = self.new_model()
        model(input_ids=self.batch(1, 8), labels=self.batch(1, 8)).loss.backward()  # kernels and workspaces
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows = []
        for b, s in cases:
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(3, self.config.vocab_size, (b, s), device="cuda")
            model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
            rows.append({"micro_batch": b, "seq_len": s, "weights": weights,
                         "measured": torch.cuda.max_memory_allocated(),
                         "reserved": torch.cuda.max_memory_reserved()})
            del ids
        model.zero_grad(set_to_none=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        return rows

    def for_generation(self):
        model = self.trained if self.trained is not None else self.new_model()
        model.eval()
        model.config.use_cache = True
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        batch = self.tokenizer(list(PROMPTS), return_tensors="pt", padding=True).to(self.device)
        return model, dict(batch)

    def new_token_counts(self, new, limit: int) -> list[tuple[int, bool]]:
        """(tokens generated, ended at EOS) per row of the generated part: up to and including the
        first EOS; after it only padding may follow."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        counts = []
        for row in new.tolist():
            if eos in row:
                n = row.index(eos) + 1
                counts.append((n if all(t == pad for t in row[n:]) else -1, True))
            else:
                counts.append((len(row) if len(row) <= limit else -1, False))
        return counts


# ---------------------------------------------------------------------- CPU memory, in a fresh process

def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(config: dict, cases: list) -> list[dict]:
    """benchmarks/memory.py's measurement: warm up at 1 x 8 tokens, reset the resident high-water
    mark, two AdamW steps at b x s; the growth plus the weights (resident before)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    enable_checkpointing(model)
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def steps(n: int, b: int, s: int) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(n):
            ids = torch.randint(3, config.vocab_size, (b, s))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    rows = []
    for b, s in cases:
        steps(1, 1, 8)
        gc.collect()
        ready = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError as err:
            rows.append({"micro_batch": b, "seq_len": s, "weights": weights, "measured": None,
                         "note": f"not measured: {err}"})
            continue
        steps(2, b, s)
        rows.append({"micro_batch": b, "seq_len": s, "weights": weights,
                     "measured": _status_bytes("VmHWM") - ready + weights})
    return rows


def measure_cpu(config: dict, cases: list) -> list[dict]:
    """`memory_child` in a fresh interpreter, glibc's mmap threshold fixed (benchmarks/memory.py)."""
    if not Path("/proc/self/status").exists():
        return [{"micro_batch": b, "seq_len": s, "measured": None, "note": "not measured: no /proc"} for b, s in cases]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps({"config": config, "cases": cases})],
                          env=env, stdout=subprocess.PIPE, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the memory measurement exited with {proc.returncode} (its stderr is above)")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------- main

CHECKS = ("environment", "build", "full_finetune", "lora", "generation_greedy", "generation_beam", "memory",
          "self_contained")


def run(device: str) -> dict:
    started = time.perf_counter()
    check = Check(device)
    methods = {"memory": check.memory_check}
    results = {}
    for name in CHECKS:
        if name not in ("environment", "self_contained") and not results["environment"]["passed"]:
            results[name] = {"passed": False, "error": "skipped: no usable device"}
            continue
        if name not in ("environment", "build", "self_contained") and check.config is None:
            results[name] = {"passed": False, "error": "skipped: the student was not built"}
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            results[name] = (methods.get(name) or getattr(check, name))()
        except Exception as err:  # noqa: BLE001 - every check reports, the others still run
            traceback.print_exc()
            results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{name}: {'passed' if results[name]['passed'] else 'FAILED'}")
    env = results["environment"]
    versions = {k: env.get(k) for k in ("python", "torch", "transformers", "peft", "accelerate", "tokenizers", "cuda",
                                        "gpu", "gpu_memory_gib", "compute_capability", "bf16")}
    return {"check": "gpu_check", "device": device, "precision": check.precision, "versions": versions,
            "passed": all(r["passed"] for r in results.values()),
            "failed": [name for name, r in results.items() if not r["passed"]],
            "checks": results, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the GPU check (bf16); cpu: its CPU twin (fp32)")
    parser.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/gpu-check-h100.json)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with json_stdout() as stdout:
        if args.memory_child:
            job = json.loads(args.memory_child)
            stdout.write(json.dumps(memory_child(job["config"], job["cases"])) + "\n")
            return 0
        result = run(args.device)
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        stdout.write(text + "\n")
    log("all checks passed" if result["passed"] else f"FAILED: {', '.join(result['failed'])}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
