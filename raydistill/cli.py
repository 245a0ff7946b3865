"""`raydistill` command line: one subcommand per stage, each implemented by its module's `main`."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
COMMANDS = {
    "sweep": ("raydistill.sweep", "run a sweep from a YAML config (Tune -> Train -> eval -> MLflow)"),
    "train": ("raydistill.train", "fine-tune one student on one annotation cell"),
    "eval": ("raydistill.evaluate", "evaluate a model on a task's test set"),
    "annotate": ("raydistill.annotate", "generate teacher annotations with litellm on Ray Data"),
    "data": ("raydistill.datasets", "inspect, export and check the dataset registry"),
    "report": ("raydistill.report", "tables and plots for a finished sweep"),
    "plan": ("raydistill.plan", "a sweep's requests, tokens, dollars, time and power, before it runs"),
}


def usage() -> str:
    lines = ["usage: raydistill <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `raydistill <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"raydistill: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
