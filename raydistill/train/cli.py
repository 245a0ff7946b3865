"""SFT stage: Ray Train `TorchTrainer` + DeepSpeed ZeRO on an annotations Parquet.

The `raydistill train` command (its description is the line above); its YAML train config is read by
`raydistill.spec.load_train_spec`:

    raydistill train --student tiny-llama --data cell.parquet --out runs/ --set epochs=1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from raydistill.files import write_json
from raydistill.spec import SpecError, load_train_spec, parse_overrides
from raydistill.train.data import read_examples
from raydistill.train.driver import check_storage, fit
from raydistill.train.job import TrainInputError, TrainJob
from raydistill.train.memory_check import check_memory_on_driver


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raydistill train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="registry name or local HF folder")
    parser.add_argument("--data", required=True, help="Parquet with question and rationale columns")
    parser.add_argument("--out", default="outputs/train",
                        help="storage for checkpoints: a local folder or a URI such as s3://bucket/runs or "
                             "gs://bucket/runs (credentials from the environment, as for pyarrow)")
    parser.add_argument("--download-to", help="with URI storage, the local folder the final model is copied to "
                                              "(default: checkpoints/ in the model cache, $RAYDISTILL_CACHE_DIR "
                                              "or ~/.cache/raydistill/models)")
    parser.add_argument("--name", default="sft", help="run name under --out")
    parser.add_argument("--config", help="YAML of TrainSpec fields (e.g. zero_stage, lora, deepspeed_config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainSpec field, e.g. --set epochs=1 --set zero_stage=2")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the result (the JSON printed at the end) here, apart from Ray's log lines")
    args = parser.parse_args(argv)

    import ray

    from raydistill.students import StudentError, resolve_student

    storage = args.out if "://" in args.out else str(Path(args.out).resolve())
    try:
        spec = load_train_spec(args.config, parse_overrides(args.set))
        read_examples(args.data)
        check_storage(storage)
        model_path = resolve_student(args.student)
        job = TrainJob(student=args.student, model_path=str(model_path),
                       data_path=str(Path(args.data).resolve()), run_name=args.name,
                       storage_path=storage, spec=spec)
        check_memory_on_driver(job, spec)
    except (TrainInputError, StudentError, SpecError) as err:
        parser.error(str(err))
    ray.init(ignore_reinit_error=True)
    result = asdict(fit(job, download_to=args.download_to))
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0
