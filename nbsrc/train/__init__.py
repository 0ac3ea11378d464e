"""Training: the loop, checkpoints, run directories and DDP helpers."""

from nbsrc.train.checkpoint import load_checkpoint, save_checkpoint
from nbsrc.train.loop import amp_settings, build_optimizer, lr_factor, resolve_device, train
from nbsrc.train.rundir import append_metrics, load_results, prepare_run_dir, read_metrics, run_state

__all__ = [
    "train", "resolve_device", "amp_settings", "build_optimizer", "lr_factor", "save_checkpoint",
    "load_checkpoint", "prepare_run_dir", "read_metrics", "append_metrics", "load_results", "run_state",
]
