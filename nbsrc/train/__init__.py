"""Training: one loop (:func:`fit`) and its tasks (pairs, tuples), checkpoints, run directories
and DDP helpers."""

from nbsrc.train.checkpoint import load_checkpoint, save_checkpoint
from nbsrc.train.loop import TrainingTask, amp_settings, build_optimizer, fit, lr_factor, resolve_device
from nbsrc.train.pair_task import PairTask
from nbsrc.train.rundir import append_metrics, load_results, prepare_run_dir, read_metrics, run_state
from nbsrc.train.tuple_task import TupleTask

__all__ = [
    "fit", "TrainingTask", "PairTask", "TupleTask", "resolve_device", "amp_settings",
    "build_optimizer", "lr_factor", "save_checkpoint", "load_checkpoint", "prepare_run_dir", "read_metrics",
    "append_metrics", "load_results", "run_state",
]
