"""Peak training memory on CPU, measured, next to `raydistill.memory.estimate_training_memory`.

All cases run one after the other in one fresh process. Each builds the student in fp32 (random
weights from its config), takes one warm-up step at 1 x 8 tokens (so lazily loaded kernels and
thread pools are in the baseline), then two full steps (forward, backward, torch.optim.AdamW step)
at micro-batch b x s random tokens. The measured peak is the growth of the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs after the warm-up) plus the weights,
which were resident before it. glibc's malloc runs with a fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536) so that freed tensors go back to the kernel: with its default
sliding threshold, freed memory stays in malloc's heaps and the resident peak grows up to twice
the tensors alive at any moment.

    python benchmarks/memory.py                       # tiny-llama and smollm2-135m shapes, ~3 min
    python benchmarks/memory.py --out outputs/bench/memory.json

On a GPU (`--device cuda`, benchmarks/gpu_smoke.sh) it loads the real students in bf16 with the
settings training uses there (the family's attention, gradient checkpointing), runs one forward
and backward at micro-batch b x the longest training sequence of the task (any level of the
teacher's cells, at most --cutoff-len tokens) and prints `torch.cuda.max_memory_allocated` beside
the estimate's weights + gradients + activations + logits (no optimizer step: DeepSpeed's
optimizer state is not what plain torch would allocate; no CUDA context, which the allocator
does not count):

    python benchmarks/memory.py --device cuda --task math --students bloom-3b gemma-2b llama-3.2-3b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
CASES = [  # (student, micro_batch, seq_len, attn, gradient checkpointing)
    ("tiny-llama", 2, 1024, "eager", False), ("tiny-llama", 2, 2048, "eager", False),
    ("tiny-llama", 2, 2048, "eager", True), ("tiny-llama", 8, 1024, "eager", False),
    ("tiny-llama", 8, 2048, "eager", False), ("tiny-llama", 8, 1024, "eager", True),
    ("tiny-llama", 2, 2048, "sdpa", False), ("tiny-llama", 16, 1024, "sdpa", False),
    ("tiny-llama", 16, 2048, "sdpa", False), ("tiny-llama", 16, 2048, "sdpa", True),
    ("smollm2-135m", 1, 512, "sdpa", False), ("smollm2-135m", 2, 512, "eager", False),
    ("smollm2-135m", 2, 512, "sdpa", True),
]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(case: dict) -> dict:
    """In a fresh process (see `measure`): train two steps and return the measured peak (bytes)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(case["path"]) if case.get("path") else LlamaConfig(**case["config"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation=case["attn"], dtype=torch.float32)
    model.train()
    if case["checkpointing"]:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def steps(n: int, b: int, s: int) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(n):
            ids = torch.randint(3, config.vocab_size, (b, s))
            loss = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps(1, 1, 8)
    gc.collect()
    ready = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    steps(2, case["b"], case["s"])
    return {**case, "measured": _status_bytes("VmHWM") - ready + weights, "parameters": weights // 4}


def measure(cases: list[dict], timeout: float = 600) -> list[dict]:
    """`child` of each case, one after the other in one fresh interpreter (glibc's mmap threshold
    fixed; every case frees its model before the next resets the high-water mark)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate(config, case: dict):
    from raydistill.memory import estimate_training_memory

    return estimate_training_memory(config, micro_batch_size=case["b"], seq_len=case["s"], precision="fp32",
                                    zero_stage=0, world_size=1, gradient_checkpointing=case["checkpointing"],
                                    attn_implementation=case["attn"], device="cpu")


def longest_sequence(student: str, model_path: str, task: str, teacher: str, cutoff_len: int) -> int:
    """The longest tokenized training sequence of the task's cells of `teacher` (every level there is)."""
    from transformers import AutoTokenizer

    from raydistill.datasets import load_train
    from raydistill.students import get_student
    from raydistill.train import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = get_student(student).prompt_template
    template.fix_tokenizer(tokenizer)
    longest = 0
    for level in range(1, 7):
        try:
            rows = load_train(task, teacher, level=level).select(["question", "rationale"]).to_pylist()
        except Exception:  # noqa: BLE001 - a level the release does not have
            continue
        examples, _ = tokenize_examples(rows, tokenizer, template, cutoff_len)
        longest = max([longest, *(len(e["input_ids"]) for e in examples)])
    return longest


def gpu_rows(students: list[str], task: str, teacher: str, micro_batch: int, cutoff_len: int) -> list[dict]:
    """Measured peak of one forward/backward on the GPU beside the estimate, per student."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raydistill.memory import estimate_training_memory
    from raydistill.students import get_student, resolve_student

    rows = []
    for student in students:
        path = str(resolve_student(student))
        seq = longest_sequence(student, path, task, teacher, cutoff_len)
        attn = get_student(student).attention or "sdpa"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn).cuda()
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(3, model.config.vocab_size, (micro_batch, seq), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        measured = torch.cuda.max_memory_allocated()
        est = estimate_training_memory(AutoConfig.from_pretrained(path), micro_batch_size=micro_batch, seq_len=seq,
                                       precision="bf16", zero_stage=0, world_size=1, gradient_checkpointing=True,
                                       attn_implementation=attn, device="cuda")
        comparable = est.parameters + est.gradients + est.activations + est.logits
        rows.append({"student": student, "b": micro_batch, "s": seq, "attn": attn, "measured": measured,
                     "estimate_without_optimizer": comparable, "pieces": est.__dict__,
                     "ratio": measured / comparable})
        print(f"{student:13} {micro_batch}x{seq} {attn:5} measured {measured / 2**30:6.1f} GiB, "
              f"estimate {comparable / 2**30:6.1f} GiB (ratio {measured / comparable:.2f})", flush=True)
        del model, ids
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--students", nargs="+", default=["bloom-3b", "gemma-2b", "llama-3.2-3b"], help="cuda only")
    parser.add_argument("--task", default="math", help="cuda only: whose longest training rows")
    parser.add_argument("--teacher", default="chatgpt", help="cuda only")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="cuda only")
    parser.add_argument("--cutoff-len", type=int, default=4096, help="cuda only")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        rows = gpu_rows(args.students, args.task, args.teacher, args.micro_batch_size, args.cutoff_len)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))
        return 0
    if args.child:
        print(json.dumps([child(case) for case in json.loads(args.child)]))
        return 0
    from transformers import AutoConfig, LlamaConfig

    from raydistill.students import resolve_student

    tiny = str(resolve_student("tiny-llama"))
    configs = {"tiny-llama": AutoConfig.from_pretrained(tiny), "smollm2-135m": LlamaConfig(**SMOLLM2_135M)}
    cases = [{"student": student, "b": b, "s": s, "attn": attn, "checkpointing": ckpt,
              **({"path": tiny} if student == "tiny-llama" else {"config": SMOLLM2_135M})}
             for student, b, s, attn, ckpt in CASES]
    rows = []
    print(f"{'student':13} {'b x s':>9} {'attn':5} {'ckpt':4} {'measured':>9} {'estimate':>9} {'ratio':>5}  "
          "(MiB; estimate = weights + grads + adam + activations + logits)")
    for row in measure(cases):
        est = estimate(configs[row["student"]], row)
        rows.append({**row, "estimate": est.total(), "pieces": est.__dict__})
        size = f"{row['b']}x{row['s']}"
        print(f"{row['student']:13} {size:>9} {row['attn']:5} "
              f"{'on' if row['checkpointing'] else 'off':4} {row['measured'] / 2**20:9.0f} "
              f"{est.total() / 2**20:9.0f} {row['measured'] / est.total():5.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
