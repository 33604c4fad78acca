"""ArrayDataset iteration (orders, DDP shards, batch shapes), DataConfig, and store atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks import ConfigError, DataConfig, load
from tasks import store as st


@pytest.fixture
def vqa_data(lxmert_root, tmp_path):
    root, _ = lxmert_root
    return load(DataConfig(name="vqa", root=str(root), cache_dir=str(tmp_path / "cache")))


def test_shuffle_is_a_function_of_seed_and_epoch(vqa_data):
    ds = vqa_data.train
    a = ds.shard_order(True, seed=1, epoch=0)
    assert np.array_equal(a, ds.shard_order(True, seed=1, epoch=0))
    assert not np.array_equal(a, ds.shard_order(True, seed=1, epoch=1))
    assert not np.array_equal(a, ds.shard_order(True, seed=2, epoch=0))
    assert sorted(a.tolist()) == list(range(len(ds)))
    assert ds.shard_order(False).tolist() == list(range(len(ds)))


@pytest.mark.parametrize("world_size", [2, 4, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards_disjoint_equal_and_covering(vqa_data, world_size, drop_last):
    ds = vqa_data.train  # 27 questions: not divisible by 2, 4 or 5
    n = len(ds)
    shards = [ds.shard_order(True, 7, 3, r, world_size, drop_last) for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1
    allpos = np.concatenate(shards)
    if drop_last:
        assert len(set(allpos.tolist())) == len(allpos) == n - n % world_size  # disjoint
    else:
        assert set(allpos.tolist()) == set(range(n))  # covering; pads repeat < world_size positions
        assert len(allpos) - n == (-n) % world_size
    # the batches agree with the shard and with num_batches
    for r, shard in enumerate(shards):
        qids = [b["question_id"] for b in ds.batches(4, True, 7, 3, r, world_size, drop_last)]
        assert len(qids) == ds.num_batches(4, world_size, drop_last)
        want = ds.question_ids[shard[: len(shard) - len(shard) % 4 if drop_last else None]]
        assert sorted(torch.cat(qids).tolist()) == sorted(want.tolist())
    with pytest.raises(ValueError, match="rank=5"):
        ds.shard_order(True, rank=5, world_size=5)


def test_batch_keys_shapes_dtypes(vqa_data):
    b = next(vqa_data.train.batches(8, shuffle=True))
    want = {
        "input_ids": ((8, 20), torch.int64),
        "attention_mask": ((8, 20), torch.int64),
        "token_type_ids": ((8, 20), torch.int64),
        "visual_feats": ((8, 4, 16), torch.float32),
        "visual_pos": ((8, 4, 4), torch.float32),
        "targets": ((8, 5), torch.float32),
        "question_id": ((8,), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in b.items()} == want
    assert (b["attention_mask"].sum(1) >= 3).all() and (b["input_ids"][:, 0] == 101).all()
    last = list(vqa_data.train.batches(8))[-1]
    assert len(last["question_id"]) == 27 % 8
    with pytest.raises(KeyError, match="question_id 424242"):
        vqa_data.train.positions([424242])


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"DataConfig\.name='coco'"):
        DataConfig(name="coco")
    with pytest.raises(ConfigError, match=r"DataConfig\.features"):
        DataConfig(features="pixels")
    with pytest.raises(ConfigError, match=r"DataConfig\.train_limit=-1"):
        DataConfig(train_limit=-1)
    with pytest.raises(ConfigError, match=r"DataConfig\.max_seq_len must be int"):
        DataConfig(max_seq_len="20")
    with pytest.raises(ConfigError, match=r"'minival'.*not a easyvqa split"):
        DataConfig(eval_split="minival")
    with pytest.raises(ConfigError, match=r"DataConfig\.root is empty"):
        DataConfig(name="vqa")


def test_config_flat_round_trip_and_defaults():
    cfg = DataConfig(name="vqa", root="/data", train_limit=10)
    flat = cfg.to_flat("data.")
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    back = DataConfig.from_flat({k: str(v) for k, v in flat.items()}, "data.")
    assert back == cfg
    r = cfg.resolved()
    assert (r.train_splits, r.eval_split, r.max_seq_len) == ("train,nominival", "minival", 20)
    assert DataConfig().resolved().max_seq_len == 13
    with pytest.raises(ConfigError, match="unknown DataConfig key 'data.nme'"):
        DataConfig.from_flat({"data.nme": "x"}, "data.")


def test_build_once_publishes_atomically_and_loses_races_quietly(tmp_path):
    final = tmp_path / "store"
    calls = []

    def build(tmp):
        calls.append(tmp)
        st.save(tmp, "x", np.arange(3))
        assert not final.exists()  # nothing visible under the final name while building
        return {"ok": 1}

    st.build_once(final, build)
    st.build_once(final, build)  # idempotent
    assert len(calls) == 1 and st.is_complete(final)
    # a process that loses the race finds the final name taken: its copy is dropped, no error
    tmp = tmp_path / "store.tmp-other"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    st.publish(tmp, final)
    assert not tmp.exists() and np.load(final / "x.npy").tolist() == [0, 1, 2]
    # a failing build leaves neither the final store nor its temporary directory
    with pytest.raises(RuntimeError):
        st.build_once(tmp_path / "bad", lambda t: (_ for _ in ()).throw(RuntimeError("boom")))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bad") and not p.name.endswith(".lock")] == []


def test_epoch_size_walks_through_distinct_questions():
    from tasks.dataset import epoch_positions, shard_order

    n, size = 10, 4
    epochs = [epoch_positions(n, size, seed=3, epoch=e) for e in range(5)]
    assert all(len(e) == size for e in epochs)
    stream = np.concatenate(epochs)
    # the first 10 positions of the stream are one permutation: epochs 0-1 and half of 2 are distinct
    assert sorted(stream[:10].tolist()) == list(range(n))
    assert sorted(stream[10:20].tolist()) == list(range(n))  # then the next permutation
    assert not np.array_equal(stream[:10], stream[10:20])
    assert np.array_equal(epoch_positions(n, size, 3, 2), epochs[2])  # deterministic
    # ranks split one epoch's positions disjointly
    shards = [shard_order(n, True, 3, 1, r, 2, epoch_size=size) for r in range(2)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(epochs[1].tolist())
