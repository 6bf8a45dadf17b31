"""The probes read a small deterministic train set whole, once (reading a probe batch row by row cost more than the
rest of a small model's probe pass): the same rows, the same training, and row-by-row reads wherever the whole read
would not give the same rows."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyMLP, make_split

import hf_ddlr._batches as batches
from hf_ddlr import MetaLRConfig, MetaLRTrainer


def _trainer(tmp_path, train, steps=6, **kw) -> MetaLRTrainer:
    args = MetaLRConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                        max_steps=steps, per_device_train_batch_size=8, probe_batches=1, seed=0, data_seed=0, **kw)
    torch.manual_seed(0)
    return MetaLRTrainer(model=TinyMLP(), args=args, train_dataset=train, meta_dataset=make_split(16, seed=7))


@pytest.mark.parametrize("fmt", [None, "torch", "numpy"])
def test_whole_read_gives_the_training_of_row_by_row_reads(tmp_path, monkeypatch, fmt):
    """Rates and weights after six probe steps are bit-identical with the whole read and with row-by-row reads
    (MAX_BULK_BYTES = 0), for python, torch and numpy formats."""
    def run(bulk: bool):
        monkeypatch.setattr(batches, "MAX_BULK_BYTES", 64 * 2**20 if bulk else 0)
        train = make_split(40, seed=6)
        t = _trainer(tmp_path / str(bulk), train.with_format(fmt) if fmt else train)
        t.train()
        assert (t._schedule.probe_sampler._columns is not None) == bulk
        return t.rates.instance.clone(), {k: v.clone() for k, v in t.model.state_dict().items()}

    (r1, w1), (r0, w0) = run(True), run(False)
    assert not torch.equal(r1, torch.ones_like(r1))
    assert torch.equal(r1, r0)
    for k in w1:
        assert torch.equal(w1[k], w0[k]), k


def test_rows_from_the_whole_read_equal_the_row_reads(tmp_path):
    """Every row the sampler serves equals what reading that row gives (values and types)."""
    train = make_split(40, seed=6).with_format("torch")
    t = _trainer(tmp_path, train, steps=1)
    sampler = batches.ProbeSampler(t)
    ds, _ = batches.prepared_for_reading(t, train, "training")
    rows = [3, 17, 0, 39]
    assert batches._same_value(sampler._read(ds, rows), batches._read_rows(ds, rows))  # first use: checked read
    assert sampler._columns is not None
    served = sampler._read(ds, [5, 38, 5])
    for i, row in zip([5, 38, 5], served):
        assert batches._same_value(row, ds[i])


def test_a_transform_or_a_large_table_is_read_row_by_row(tmp_path, monkeypatch):
    """A set_transform may draw new augmentations on every read, and a table over MAX_BULK_BYTES stays on disk."""
    calls = []

    def transform(batch):
        calls.append(len(batch["x"]))
        return batch

    t = _trainer(tmp_path / "t", make_split(40, seed=6).with_transform(transform), steps=3)
    t.train()
    assert t._schedule.probe_sampler._columns is None
    monkeypatch.setattr(batches, "MAX_BULK_BYTES", 100)  # the 40-row table is ~2 kB
    t = _trainer(tmp_path / "l", make_split(40, seed=6), steps=3)
    t.train()
    assert t._schedule.probe_sampler._columns is None


def test_a_whole_read_that_differs_from_the_row_reads_is_not_used(tmp_path, monkeypatch):
    """If the whole read does not give the rows a row read gives (here: a dataset whose slices are off by one), the
    sampler keeps reading row by row."""
    train = make_split(40, seed=6)

    class Shifted(type(train)):
        def __getitem__(self, key):
            if isinstance(key, slice):  # the whole read: every row shifted by one
                out = super().__getitem__(key)
                return {k: v[1:] + v[:1] for k, v in out.items()}
            return super().__getitem__(key)

    shifted = Shifted(train.data, info=train.info, split=train.split)
    t = _trainer(tmp_path, shifted, steps=1)
    sampler = batches.ProbeSampler(t)
    ds, _ = batches.prepared_for_reading(t, shifted, "training")
    sampler._read(ds, [0, 1, 2])
    assert sampler._columns is None
