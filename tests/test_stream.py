"""embed_to_memmap: streaming to disk, resuming after an interruption, refusing mismatches."""

import json

import numpy as np
import pytest
import torch

from nbsrc.errors import ConfigError
from nbsrc.eval.recall_eval import extract_embeddings
from nbsrc.eval.stream import embed_to_memmap, model_fingerprint, sidecar_path


class TinyImages(torch.utils.data.Dataset):
    """``n`` fixed random 3x4x4 images; counts how often each item is read."""

    def __init__(self, n: int = 23, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.reads = np.zeros(n, dtype=int)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.x[i], i % 3, i


class Interrupt(Exception):
    pass


class FailsAfter(torch.utils.data.Dataset):
    """Wraps a dataset and raises on item ``first_bad`` (a crash in the middle of the run)."""

    def __init__(self, ds, first_bad: int):
        self.ds, self.first_bad = ds, first_bad

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i >= self.first_bad:
            raise Interrupt(f"simulated crash at item {i}")
        return self.ds[i]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.Dropout(0.5))


def test_one_shot_equals_extract_embeddings_in_float16(tmp_path):
    model, ds = tiny_model(), TinyImages()
    out = embed_to_memmap(model, ds, tmp_path / "g.npy", batch_size=5, progress=False)
    ref, _, _ = extract_embeddings(model, ds, batch_size=5, progress=False)
    assert isinstance(out, np.memmap) and out.shape == (23, 8) and out.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(out), ref.astype(np.float16))
    assert json.loads(sidecar_path(tmp_path / "g.npy").read_text())["rows_done"] == 23
    assert model[2].training  # train mode restored (dropout was off during extraction: equality above)


@pytest.mark.parametrize("k", [1, 3])
def test_interrupt_after_k_batches_then_resume_equals_one_shot(tmp_path, k):
    model, bs = tiny_model(), 5
    ds = TinyImages()
    with pytest.raises(Interrupt):
        embed_to_memmap(model, FailsAfter(ds, k * bs), tmp_path / "g.npy", batch_size=bs, progress=False)
    assert json.loads(sidecar_path(tmp_path / "g.npy").read_text())["rows_done"] == k * bs
    ds.reads[:] = 0
    resumed = embed_to_memmap(model, ds, tmp_path / "g.npy", batch_size=bs, progress=False)
    assert (ds.reads[: k * bs] == 0).all() and (ds.reads[k * bs :] == 1).all()  # finished rows not recomputed
    one_shot = embed_to_memmap(model, TinyImages(), tmp_path / "h.npy", batch_size=bs, progress=False)
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(one_shot))


def test_rerun_of_a_finished_file_reads_nothing(tmp_path):
    model, ds = tiny_model(), TinyImages()
    first = np.array(embed_to_memmap(model, ds, tmp_path / "g.npy", batch_size=4, progress=False))
    ds.reads[:] = 0
    again = embed_to_memmap(model, ds, tmp_path / "g.npy", batch_size=4, progress=False)
    assert ds.reads.sum() == 0
    np.testing.assert_array_equal(np.asarray(again), first)


def _interrupted(tmp_path, model, ds, bs=5):
    with pytest.raises(Interrupt):
        embed_to_memmap(model, FailsAfter(ds, 2 * bs), tmp_path / "g.npy", batch_size=bs, progress=False)


def test_resume_with_other_weights_is_refused(tmp_path):
    _interrupted(tmp_path, tiny_model(0), TinyImages())
    with pytest.raises(ConfigError, match="different model weights"):
        embed_to_memmap(tiny_model(1), TinyImages(), tmp_path / "g.npy", batch_size=5, progress=False)


def test_resume_with_another_dataset_length_is_refused(tmp_path):
    _interrupted(tmp_path, tiny_model(), TinyImages(23))
    with pytest.raises(ConfigError, match="different number of rows"):
        embed_to_memmap(tiny_model(), TinyImages(30), tmp_path / "g.npy", batch_size=5, progress=False)


def test_resume_with_another_dtype_or_batch_size_is_refused(tmp_path):
    _interrupted(tmp_path, tiny_model(), TinyImages())
    with pytest.raises(ConfigError, match="different dtype"):
        embed_to_memmap(tiny_model(), TinyImages(), tmp_path / "g.npy", 5, dtype=np.float32, progress=False)
    with pytest.raises(ConfigError, match="different batch size"):
        embed_to_memmap(tiny_model(), TinyImages(), tmp_path / "g.npy", 4, progress=False)


def test_unreadable_progress_file_is_a_one_line_error(tmp_path):
    from nbsrc.eval.stream import recorded_batch_size

    assert recorded_batch_size(tmp_path / "g.npy") is None  # nothing started there
    _interrupted(tmp_path, tiny_model(), TinyImages())
    assert recorded_batch_size(tmp_path / "g.npy") == 5  # what a resume must keep
    side = tmp_path / "g.npy.progress.json"
    for text in ('{"rows_done": 5', '[1, 2]'):
        side.write_text(text)
        with pytest.raises(ConfigError, match="not a readable progress file .* delete it and .*g.npy to start again"):
            embed_to_memmap(tiny_model(), TinyImages(), tmp_path / "g.npy", 5, progress=False)
        with pytest.raises(ConfigError, match="not a readable progress file"):
            recorded_batch_size(tmp_path / "g.npy")


def test_existing_file_without_sidecar_is_refused(tmp_path):
    np.save(tmp_path / "g.npy", np.zeros((23, 8), np.float16))
    with pytest.raises(ConfigError, match="without its progress file"):
        embed_to_memmap(tiny_model(), TinyImages(), tmp_path / "g.npy", batch_size=5, progress=False)


def test_fingerprint_changes_with_any_weight():
    a, b = tiny_model(0), tiny_model(0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b[1].bias[3] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
