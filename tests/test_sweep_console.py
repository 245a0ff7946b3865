"""The quiet console of a sweep without --verbose (`raydistill.sweep.console.quiet_console`).

A process writes the kinds of output a sweep's driver meets (print, a library's logger, raw
writes to file descriptor 2 as C code does, a tqdm bar, a child process) inside the context:
only raydistill's lines reach its stdout and stderr, the rest is in the log file. The console
of a whole sweep is checked in tests/test_sweep_resume.py (`sweep_console.check_quiet_console`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WRITES_EVERYTHING = textwrap.dedent("""
    import logging, os, subprocess, sys
    from pathlib import Path
    from tqdm import tqdm
    from raydistill.sweep.console import quiet_console, say  # imports Ray, which sets up its loggers

    with quiet_console(Path(sys.argv[1])):
        print("a library's print")
        logging.getLogger("ray.worker").warning("Token authentication is enabled for this Ray cluster")
        logging.getLogger("mlflow.store").warning("Creating initial MLflow database tables")
        os.write(2, b"raylet: a C library's write to fd 2\\n")
        subprocess.run(["echo", "a child process's line"], check=True)
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
            pass
        logging.getLogger("raydistill.sweep").info("sweep tiny: 2 trials")
        say("[0/2] svamp chatgpt L1 cot tiny-llama seed 100: training")
    print("after: the console again", flush=True)
    with quiet_console(Path(sys.argv[1]).with_name("failed.log")):  # a sweep that fails
        print("a library's print before the error")
        raise RuntimeError("a trial failed")
""")


def test_only_raydistill_lines_reach_the_console_the_rest_goes_to_the_log(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITES_EVERYTHING, str(tmp_path / "sweep.log")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "sweep.log").read_text()
    out = done.stdout.splitlines()
    assert out[0].startswith(f"log           : {tmp_path / 'sweep.log'} "), done.stdout + done.stderr
    assert out[1].endswith(" raydistill.sweep: sweep tiny: 2 trials")
    assert out[2:4] == ["[0/2] svamp chatgpt L1 cot tiny-llama seed 100: training", "after: the console again"]
    assert len(out) == 5 and out[4].startswith(f"log           : {tmp_path / 'failed.log'} ")
    # the error reaches the console (stderr), its traceback not the log
    assert done.returncode == 1 and done.stderr.startswith("Traceback") and "RuntimeError: a trial failed" in done.stderr
    failed = (tmp_path / "failed.log").read_text()
    assert "a library's print before the error" in failed and "RuntimeError" not in failed + log
    for line in ("a library's print", "Token authentication is enabled", "Creating initial MLflow database tables",
                 "raylet: a C library's write to fd 2", "a child process's line",
                 "raydistill.sweep: sweep tiny: 2 trials"):
        assert log.count(line) == 1, (line, log)  # each once
    assert "Converting and de-quantizing GGUF tensors: 100%" in log  # the bar (redrawn with \r)
    assert "[0/2] svamp" not in log and "after:" not in log

