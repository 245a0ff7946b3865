"""SFT stage: Ray Train `TorchTrainer` + DeepSpeed ZeRO on an annotations Parquet.

Each worker tokenises the cell with the student's template (loss on the response tokens only),
draws its shard of length-grouped micro-batches, and steps a DeepSpeed engine. Rank 0 saves the
final model as a plain HF folder that evaluation loads.

    raydistill train --student tiny-llama --data cell.parquet --out runs/ --set epochs=1

Parts:
  job           `TrainJob`, `TrainResult`, `TrainInputError`
  data          reading the training Parquet, tokenising, length-grouped micro-batches, collating
  ds_config     the DeepSpeed config (shipped JSON files + "auto" values) and the LR schedule
  checkpoints   when to checkpoint, save / restore the DeepSpeed state, the train state, the final folder
  model         the student's weights on a worker: device and precision checks, attention, LoRA
  memory_check  whether the run fits its GPUs (driver and workers), the fp32 warning
  worker        `train_loop_per_worker`, the loop every Ray Train worker runs
  driver        `fit`: the driver side of a run, its checks and the `TorchTrainer`
  cli           `raydistill train` and its YAML train config
"""

from raydistill.train.checkpoints import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    TRAIN_STATE_FILE,
    checkpoint_steps,
    read_train_state,
)
from raydistill.spec import load_train_spec
from raydistill.train.cli import main
from raydistill.train.data import (
    IGNORE_INDEX,
    collate,
    micro_batches,
    padding_fraction,
    read_examples,
    tokenize_examples,
)
from raydistill.train.driver import check_storage, fit
from raydistill.train.ds_config import DEEPSPEED_CONFIG_DIR, deepspeed_config, deepspeed_config_path
from raydistill.train.job import TrainInputError, TrainJob, TrainResult
from raydistill.train.memory_check import (
    check_memory_on_driver,
    longest_sequence,
    lora_parameters,
    memory_problem,
    precision_warning,
)
from raydistill.train.model import attention_of, check_precision, load_student_model, stay_on_cpu
from raydistill.train.worker import train_loop_per_worker

__all__ = [
    "DEEPSPEED_CONFIG_DIR", "DEEPSPEED_DIR", "DEEPSPEED_TAG", "IGNORE_INDEX", "TRAIN_STATE_FILE",
    "TrainInputError", "TrainJob", "TrainResult",
    "attention_of", "check_memory_on_driver", "check_precision", "check_storage", "checkpoint_steps", "collate",
    "deepspeed_config", "deepspeed_config_path", "fit", "load_student_model", "load_train_spec", "longest_sequence",
    "lora_parameters", "main", "memory_problem", "micro_batches", "padding_fraction", "precision_warning",
    "read_examples", "read_train_state", "stay_on_cpu", "tokenize_examples", "train_loop_per_worker",
]
