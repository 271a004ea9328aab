import numpy as np
import pandas as pd
import pytest
import torch

from genreclf.audio import N_FRAMES, N_MELS
from genreclf.crops import crop_starts
from genreclf.data import (
    CropBatchSampler,
    CropDataset,
    DeviceFeatures,
    EvenCropSampler,
    collate,
    lengths_entry,
    loader,
    read_batch,
    split_positions,
)
from genreclf.errors import GenreclfError
from genreclf.metadata import load_genres
from genreclf.store import FeatureStore, PartWriter, StoreHeader, part_name

JUNK = 7.0  # what the parts store holds beyond a clip's real frames: a reader that pads with it is caught


@pytest.fixture(scope="module")
def parts_path(tmp_path_factory):
    """A store of 2 parts written by PartWriter: clips of 20-938 real frames, a failed row in each part, and
    track ids shuffled across the parts, so that store positions (by track id) interleave parts and rows."""
    path = tmp_path_factory.mktemp("parts") / "store"
    genres, rng = load_genres(), np.random.default_rng(0)
    header = StoreHeader.of_genres(genres, n_parts=2, source="tests (random features)")
    path.mkdir()
    (path / "store.json").write_text(header.to_json())
    ids = rng.permutation(np.arange(1, 28))
    for k, part_ids in enumerate((ids[:13], ids[13:])):
        plan = pd.DataFrame(
            {"track_id": part_ids, "split": "training", "artist_id": 1, "genre_top": "", "path": "x.mp3"}
        )
        targets = (rng.random((len(plan), len(genres.names))) < 0.05).astype(np.uint8)
        writer = PartWriter(path / part_name(k, 2), plan, targets, N_FRAMES, N_MELS)
        for row in range(len(plan)):
            if row == 3:
                writer.fail(row, "test")
                continue
            valid = int(rng.choice([20, 60, 200, 500, N_FRAMES])) if row % 2 else int(rng.integers(20, N_FRAMES))
            features = np.full((N_FRAMES, N_MELS), JUNK, np.float16)
            features[:valid] = rng.standard_normal((valid, N_MELS))
            writer.write(row, features, valid)
        writer.finish()
    return path


def test_crop_batches_are_reproducible_and_within_real_frames():
    valid = np.array([938, 300, 100, 938, 500, 938, 64])
    args = valid, np.arange(7), 3, 128, 256, 5
    sampler = CropBatchSampler(*args)
    first, second = list(sampler), list(sampler)
    assert second != first  # the next epoch draws new crops
    assert list(CropBatchSampler(*args)) == first  # the same seed: the same crops
    assert list(CropBatchSampler(*args, first_epoch=1)) == second  # a run resumed at epoch 1
    assert sorted(p for batch in first for p, _, _ in batch) == list(range(7))
    for batch in first:
        for p, start, length in batch:
            assert start >= 0 and start + length <= valid[p] and length >= 1
        assert max(length for _, _, length in batch) <= 256
    with pytest.raises(GenreclfError):
        CropBatchSampler(valid, np.arange(7), 3, 300, 200)


def test_ddp_ranks_get_disjoint_equal_shares():
    positions = np.arange(10)
    shares = [
        list(CropBatchSampler(np.full(10, 938), positions, 6, 128, 256, seed=1, rank=r, world_size=3)) for r in range(3)
    ]
    seen = [p for share in shares for batch in share for p, _, _ in batch]
    assert len({len(share) for share in shares}) == 1  # DDP hangs if ranks run different batch counts
    assert all(len(batch) in (2, 1) for share in shares for batch in share)  # 6 / 3 each; the last: 4 padded to 6
    assert set(seen) == set(range(10)) and len(seen) == 12  # 10 tracks padded to 3 x 4


def test_ddp_ranks_share_the_one_process_batches():
    # batch_size is the global batch: the ranks' shares of each batch are what one process draws
    valid = np.array([938, 300, 100, 938, 500, 938, 64, 200, 700, 250, 938, 150])
    args = valid, np.arange(12), 4, 128, 256, 5
    one = list(CropBatchSampler(*args, first_epoch=2))
    for world in (2, 4):
        shares = [list(CropBatchSampler(*args, rank=r, world_size=world, first_epoch=2)) for r in range(world)]
        assert all(len(share) == len(one) == len(CropBatchSampler(*args, rank=0, world_size=world)) for share in shares)
        for b, batch in enumerate(one):
            assert batch == [shares[i % world][b][i // world] for i in range(len(batch))]
    with pytest.raises(GenreclfError, match="multiple of the 3 .*--batch-size 3$"):
        CropBatchSampler(*args, rank=0, world_size=3)
    with pytest.raises(GenreclfError, match="--batch-size 3$"):
        EvenCropSampler(valid, np.arange(12), 4, 256, rank=0, world_size=3)


def test_ddp_validation_counts_each_clip_once():
    valid = np.array([938, 100, 500, 300, 938])
    one = [item for batch in EvenCropSampler(valid, np.arange(5), 4, 256) for item in batch]
    for world in (2, 4):
        shares = [list(EvenCropSampler(valid, np.arange(5), 4, 256, rank=r, world_size=world)) for r in range(world)]
        assert len({len(share) for share in shares}) == 1 and all(batch for share in shares for batch in share)
        items = [item for share in shares for batch in share for item in batch]
        assert sorted(item for item in items if len(item) == 3) == sorted(one)  # each clip once, counted
        padding = [item for item in items if len(item) == 4]
        assert len(items) % world == 0 and all(item[3] == 0 and item[:3] in one for item in padding)
    # one clip on two ranks: rank 1's only batch is a duplicate
    assert list(EvenCropSampler(valid[:1], np.arange(1), 2, 256, rank=1, world_size=2)) == [[(0, 341, 256, 0)]]


def test_validation_crops_are_centred_and_fixed():
    valid = np.array([938, 100])
    batches = list(EvenCropSampler(valid, np.arange(2), 8, 256))
    assert batches == [[(0, (938 - 256) // 2, 256), (1, 0, 100)]]


def test_collate_pads_and_keeps_lengths():
    items = [
        (np.ones((5, 128), np.float32), np.array([1, 0], np.uint8)),
        (np.ones((3, 128), np.float32), np.array([0, 1], np.uint8)),
    ]
    batch = collate(items)
    assert batch["x"].shape == (2, 5, 128) and batch["lengths"].tolist() == [5, 3]
    assert batch["counted"].tolist() == [True, True]
    assert collate([(*items[0], 1), (*items[1], 0)])["counted"].tolist() == [True, False]
    assert list(collate([items[0], items[0]])) == ["x", "y", "counted"]  # whole crops: no lengths
    assert float(batch["x"][1, 3:].abs().sum()) == 0.0 and batch["y"].dtype.is_floating_point


def test_loader_reads_the_store(store_dir):
    store = FeatureStore.open(store_dir)
    train = split_positions(store, "training")
    assert set(store.split[train]) == {"training"}
    ref_train, ref_test = split_positions(store, "training", "reference"), split_positions(store, "test", "reference")
    assert len(ref_test) > 0 and not set(ref_train) & set(ref_test)
    batches = list(loader(store, CropBatchSampler(store.valid_frames, train, 4, 128, 256, seed=0)))
    assert sum(len(b["x"]) for b in batches) == len(train)
    b = batches[0]
    assert b["x"].dtype.is_floating_point and b["y"].shape[1] == 163
    with pytest.raises(GenreclfError):
        split_positions(store, "training", "nonsense")


def test_crop_starts() -> None:
    assert crop_starts(938, 300, 3) == [0, 319, 638]
    assert crop_starts(938, 300, 1) == [319]
    assert crop_starts(938, 938, 4) == [0]
    assert crop_starts(100, 300, 4) == [0]
    assert crop_starts(302, 300, 5) == [0, 1, 2]
    for n, c, k in [(938, 256, 8), (1000, 7, 13), (50, 10, 41)]:
        starts = crop_starts(n, c, k)
        assert starts[0] == 0 and starts[-1] == n - c and len(starts) == min(k, n - c + 1)
        assert np.ptp(np.diff(starts)) <= 1
    with pytest.raises(GenreclfError):
        crop_starts(938, 0, 3)
    with pytest.raises(GenreclfError):
        crop_starts(938, 300, 0)


def _per_item(store: FeatureStore, items: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A batch as the per-item path reads it: one CropDataset call per crop, then collate."""
    dataset = CropDataset(store)
    return collate([dataset[item] for item in items])


def _assert_same_batch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _samplers(store: FeatureStore) -> list:
    """Training batches with crops longer than some clips (padding), and DDP validation shares (counted=0)."""
    positions = np.arange(len(store))
    train = CropBatchSampler(store.valid_frames, positions, 6, 16, 600, seed=1)
    return [train, *(EvenCropSampler(store.valid_frames, positions, 8, 300, rank=r, world_size=4) for r in range(4))]


@pytest.mark.parametrize("which", ["fixture", "parts"])
def test_batches_read_whole_equal_the_per_item_path(store_dir, parts_path, which):
    store = FeatureStore.open(store_dir if which == "fixture" else parts_path)
    padded = uncounted = 0
    for sampler in _samplers(store):
        for items in sampler:
            batch = read_batch(store, items)
            _assert_same_batch(batch, _per_item(store, items))
            padded += "lengths" in batch
            uncounted += int((~batch["counted"]).sum())
    assert uncounted and (padded or which == "fixture")  # the fixture's clips are all 4 s: none is padded
    if which == "parts":
        assert store.header.n_parts == 2 and len(set(store.parts[:6])) == 2  # positions interleave the parts
        whole = [(p, 0, int(v)) for p, v in enumerate(store.valid_frames)]  # every clip, its real frames
        x = read_batch(store, whole)["x"]
        real = torch.arange(N_FRAMES)[None, :] < torch.from_numpy(store.valid_frames)[:, None]
        assert x.shape[1] == N_FRAMES and not real.all()
        assert not (x[~real] != 0).any() and (x[real] != 0).all()  # the junk beyond real frames is never read
    # The DataLoader, with a worker process, yields the same batches.
    sampler = _samplers(store)[0]
    for batch, items in zip(loader(store, sampler, workers=1), list(_samplers(store)[0])):
        _assert_same_batch(batch, _per_item(store, items))


def test_device_features_cut_the_crops_the_store_holds(parts_path):
    store = FeatureStore.open(parts_path)
    features = DeviceFeatures(store, "cpu")  # the code that runs on the GPU with --cache gpu
    assert features.nbytes == len(store) * N_FRAMES * N_MELS * 2 and features.features.dtype == torch.float16
    for sampler in _samplers(store):
        for items in sampler:
            index = read_batch(store, items, index_only=True)
            assert list(index) == ["position", "start", "lengths", "y", "counted"]
            x = features.crops(index["position"], index["start"], index["lengths"])
            rest = {**lengths_entry(index["lengths"]), "y": index["y"], "counted": index["counted"]}
            _assert_same_batch({"x": x, **rest}, read_batch(store, items))


def test_a_store_read_into_memory_reads_the_same_batches(parts_path):
    mapped, held = FeatureStore.open(parts_path), FeatureStore.open(parts_path)
    assert held.features_bytes == 27 * N_FRAMES * N_MELS * 2  # failed rows included
    held.read_into_memory()
    assert held.in_memory and isinstance(mapped.item(0), np.memmap) and not isinstance(held.item(0), np.memmap)
    for items in _samplers(held)[0]:
        _assert_same_batch(read_batch(held, items), read_batch(mapped, items))
