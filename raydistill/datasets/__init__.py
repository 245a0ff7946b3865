"""Dataset registry: the paper's seven tasks, their released training annotations and test sets.

Tasks come from the registry (`raydistill.tasks`); everything loads as a pyarrow Table with
``raydistill.schemas.EXAMPLE_SCHEMA``. Parts:

``mirror``
    files by their upstream relative path: mirror folder, cache or verified download
    (``resolve``), ``read_rows``, content ``digests`` and the pins (``build_manifest``).
``release``
    the training cells the release's ``dataset_info.json`` lists (``train_files``,
    ``train_file``, ``available_cells``) on the axes teacher, level and format.
``tables``
    ``load_test`` and ``load_train`` (never a test question in a training table), the opt-in
    target repair, ``target_ceiling``, the files each table reads and ``write_parquet``.
``overlap``
    ``contamination``: train/test question overlap per raw training file.
``hf_export``
    ``export_hf``: a cell's rows or a trial's predictions as a Hugging Face ``datasets`` folder
    with a dataset card (the ``hf`` extra).
``cli``
    ``raydistill data list | export | export-hf | ceiling | check-contamination | pin``.
"""

from raydistill.datasets.cli import main
from raydistill.datasets.mirror import (
    DATASET_INFO,
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA_URL,
    ENV_CACHE_DIR,
    ENV_DATA_DIR,
    ENV_DATA_URL,
    ENV_TIMEOUT,
    MANIFEST,
    ROOTS,
    ChecksumMismatch,
    DataUnavailable,
    MalformedData,
    build_manifest,
    cache_dir,
    digests,
    file_digest,
    local_path,
    mirror_dir,
    read_rows,
    resolve,
    upstream_root,
    upstream_url,
)
from raydistill.datasets.hf_export import ExportError, export_hf
from raydistill.datasets.overlap import ContaminationReport, Overlap, contamination
from raydistill.datasets.release import (
    FORMATS,
    LEVELLESS,
    LEVELS,
    TEACHERS,
    CellNotReleased,
    CellStatus,
    TrainFile,
    available_cells,
    train_file,
    train_files,
)
from raydistill.datasets.tables import (
    load_test,
    load_train,
    load_train_variants,
    pad_rationale,
    pad_to_length_of,
    question_id,
    repair_gold,
    repair_target,
    target_ceiling,
    test_sources,
    text_key,
    train_sources,
    write_parquet,
)
from raydistill.tasks import TASKS  # the task registry (datasets.TASKS)

__all__ = [
    "DATASET_INFO",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DATA_URL",
    "ENV_CACHE_DIR",
    "ENV_DATA_DIR",
    "ENV_DATA_URL",
    "ENV_TIMEOUT",
    "FORMATS",
    "LEVELLESS",
    "LEVELS",
    "MANIFEST",
    "ROOTS",
    "TASKS",
    "TEACHERS",
    "CellNotReleased",
    "CellStatus",
    "ChecksumMismatch",
    "ContaminationReport",
    "DataUnavailable",
    "ExportError",
    "MalformedData",
    "Overlap",
    "TrainFile",
    "available_cells",
    "build_manifest",
    "cache_dir",
    "contamination",
    "digests",
    "export_hf",
    "file_digest",
    "load_test",
    "load_train",
    "load_train_variants",
    "pad_rationale",
    "pad_to_length_of",
    "local_path",
    "main",
    "mirror_dir",
    "question_id",
    "read_rows",
    "repair_gold",
    "repair_target",
    "resolve",
    "target_ceiling",
    "test_sources",
    "text_key",
    "train_file",
    "train_files",
    "train_sources",
    "upstream_root",
    "upstream_url",
    "write_parquet",
]
