"""Checkpoint I/O: readers of model directories and adapters (one tensor at a time), series discovery,
parameter naming, and the atomic, sharded writer. Imports nothing above it but `errors`.

`open_model` picks the reader by the files present; `CheckpointSeries` finds a run's steps.
"""

from opd_dynamics.io.formats import open_model
from opd_dynamics.io.lora import LoraAdapter
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.naming import GROUPS, MATRIX_GROUPS, TensorName, parse_name
from opd_dynamics.io.reader import LOAD_MODES, READS, WEIGHTS, TensorReader, is_adapter_dir
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.io.sketches import SketchSeries
from opd_dynamics.io.writer import write_model

__all__ = ["GROUPS", "LOAD_MODES", "MATRIX_GROUPS", "READS", "WEIGHTS", "CheckpointSeries", "LoraAdapter", "ModelDir",
           "SketchSeries", "TensorName", "TensorReader", "is_adapter_dir", "open_model", "parse_name", "write_model"]
