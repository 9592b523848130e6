"""BatchLoader / TaskDataset and the batched augmentation ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recast.data import AugmentPolicy, BatchLoader, TaskDataset, load_split, read_manifest
from recast.data.augment import random_crop_padded, random_hflip, random_resized_crop, resize


def _expected_eval(task_dir, split, size=8):
    m = read_manifest(task_dir)
    x, y = load_split(task_dir, split)
    mean = torch.tensor(m.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.std).view(1, 3, 1, 1)
    return (resize(x.float() / 255, size) - mean) / std, y


def test_eval_batches_are_ordered_and_normalised_with_manifest_stats(tiny_task):
    task_dir, _ = tiny_task
    loader = BatchLoader(task_dir, "test", batch_size=4, image_size=8, train=False, seed=0)
    assert (len(loader), loader.num_classes, loader.num_examples) == (2, 3, 6)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ex, ey = _expected_eval(task_dir, "test")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, ex, rtol=0, atol=1e-5)
    assert torch.equal(y, ey)
    # The train split normalised with its own statistics has mean 0 and std 1 per channel.
    tx = torch.cat([b[0] for b in BatchLoader(task_dir, "train", 3, 8, train=False, seed=0)])
    torch.testing.assert_close(tx.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(tx.std((0, 2, 3), correction=0), torch.ones(3), rtol=0, atol=1e-4)


def test_resize_to_other_sizes(tiny_task):
    task_dir, _ = tiny_task
    x, _ = next(iter(BatchLoader(task_dir, "val", 4, image_size=20, train=False, seed=0)))
    assert x.shape == (4, 3, 20, 20)
    x, _ = next(iter(BatchLoader(task_dir, "val", 4, image_size=20, train=True, seed=0)))
    assert x.shape == (4, 3, 20, 20)
    policy = AugmentPolicy("resized", hflip=True, scale_min=0.5)
    x, _ = next(iter(BatchLoader(task_dir, "val", 4, image_size=12, train=True, seed=0, augment=policy)))
    assert x.shape == (4, 3, 12, 12)


def test_train_is_deterministic_per_seed_and_epoch(tiny_task):
    task_dir, _ = tiny_task

    def run(seed, epoch):
        loader = BatchLoader(task_dir, "train", 4, 8, train=True, seed=seed, drop_last=True)
        loader.set_epoch(epoch)
        return [b for b in loader]

    a, b = run(0, 0), run(0, 0)
    assert len(a) == 2  # 10 examples, drop_last
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = run(0, 1)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    d = run(1, 0)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, d))


def test_train_epoch_covers_every_example_once(tiny_task):
    task_dir, splits = tiny_task
    loader = BatchLoader(task_dir, "train", 3, 8, train=True, seed=3)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 4
    assert sorted(labels.tolist()) == sorted(splits["train"][1].tolist())


def test_limit_and_argument_errors(tiny_task):
    task_dir, splits = tiny_task
    loader = BatchLoader(task_dir, "train", 4, 8, train=False, seed=0, limit=5)
    assert (loader.num_examples, len(loader)) == (5, 2)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.from_numpy(splits["train"][1][:5]))
    with pytest.raises(ValueError, match="split='dev'"):
        BatchLoader(task_dir, "dev", 4, 8, train=False, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        BatchLoader(task_dir, "train", 0, 8, train=False, seed=0)
    with pytest.raises(ValueError, match="limit=0"):
        BatchLoader(task_dir, "train", 4, 8, train=False, seed=0, limit=0)


def test_task_dataset_matches_eval_loader_and_works_with_dataloader(tiny_task):
    task_dir, _ = tiny_task
    ds = TaskDataset(task_dir, "test", image_size=8)
    ex, ey = _expected_eval(task_dir, "test")
    assert len(ds) == 6 and ds.num_classes == 3
    x, y = ds[5]
    torch.testing.assert_close(x, ex[5], rtol=0, atol=1e-5)
    assert y == int(ey[5])
    torch.testing.assert_close(ds[-1][0], x)
    with pytest.raises(IndexError):
        ds[6]
    xb, yb = next(iter(torch.utils.data.DataLoader(TaskDataset(task_dir, "train", 8, train=True), batch_size=4)))
    assert xb.shape == (4, 3, 8, 8) and yb.dtype == torch.int64


def test_padded_crop_is_a_shifted_window_and_covers_all_offsets():
    x = torch.arange(1, 1 + 2 * 4 * 4, dtype=torch.int64).view(1, 2, 4, 4).repeat(200, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = random_crop_padded(x, 1, g)
    padded = torch.nn.functional.pad(x[0], (1, 1, 1, 1))
    windows = {(oy, ox): padded[:, oy:oy + 4, ox:ox + 4] for oy in range(3) for ox in range(3)}
    seen = set()
    for o in out:
        match = [k for k, w in windows.items() if torch.equal(o, w)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 9


def test_digit_policy_never_flips_and_flip_policy_does():
    # Pixel value = column + 1: any left-right flip makes a row decrease.
    x = (torch.arange(8) + 1).view(1, 1, 1, 8).expand(64, 3, 8, 8).to(torch.uint8).contiguous()
    from recast.data.augment import transform_batch

    def flipped(policy):
        out = transform_batch(x, 8, (0.0,) * 3, (1 / 255,) * 3, policy, torch.Generator().manual_seed(0))
        row = out[:, 0, 4]  # (B, W), zero where padded
        diffs = [(r[r > 0][1:] - r[r > 0][:-1]) for r in row]
        return torch.tensor([bool((d < 0).any()) for d in diffs])

    assert not flipped(AugmentPolicy("pad", 2, hflip=False)).any()
    share = flipped(AugmentPolicy("pad", 2, hflip=True)).float().mean().item()
    assert 0.3 < share < 0.7


def test_hflip_and_identity_resized_crop():
    x = torch.rand(16, 3, 6, 6)
    g = torch.Generator().manual_seed(1)
    out = random_resized_crop(x, 6, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    out = random_resized_crop(x, 6, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True, generator=g)
    is_flip = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    is_same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(is_flip, is_same)) and 0 < sum(is_flip) < 16
    f = random_hflip(x, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(f, x))


def test_resized_crop_zooms_in():
    # A crop of at most half the area of a left-to-right ramp spans a narrower value range.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()
    out = random_resized_crop(ramp, 32, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(0))
    spans = out[:, 0, 16].amax(-1) - out[:, 0, 16].amin(-1)
    assert bool((spans < 0.9).all()) and bool((spans > 0.2).all())
    assert np.isfinite(out.numpy()).all()


def test_raw_view_is_the_unaugmented_batch_and_reaugments_like_the_loader(tiny_task):
    """Replay of raw images (issue 22): ``with_raw_view`` batches are (augmented, labels, raw),
    the augmented view bit-identical to the plain loader's and raw = the eval transform of the
    same rows; ``augment_normalised`` of raw with the task's pad-crop policy and the loader's
    generator state gives the loader's own augmented batch (to float rounding)."""
    from recast.data.augment import TaskAugment, augment_normalised, transform_batch

    task_dir, splits = tiny_task
    m = read_manifest(task_dir)
    plain = BatchLoader(task_dir, "train", 4, 8, train=True, seed=3)
    triples = list(plain.with_raw_view())
    assert [len(b) for b in triples] == [3, 3, 3] and plain.raw_view is False
    for (x, y), (xa, ya, raw) in zip(plain, triples):
        assert torch.equal(x, xa) and torch.equal(y, ya)
        assert not torch.allclose(xa, raw)  # pad 2 crops moved most images
    # raw of the whole epoch = the eval transform of the train rows, in the loader's order
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003))
    images = torch.from_numpy(splits["train"][0])[order]
    expected = transform_batch(images, 8, m.mean, m.std)
    torch.testing.assert_close(torch.cat([b[2] for b in triples]), expected, rtol=0, atol=1e-6)
    # re-augmenting raw with the same generator draws = the loader's augmentation of the same rows
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = transform_batch(images, 8, m.mean, m.std, m.augment, gen_a)
    got = augment_normalised(expected, m.mean, m.std, m.augment, 8, gen_b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # per task id: task 0 (pad crop) changes, task 1 (no policy) passes through
    aug = TaskAugment({0: (m.mean, m.std, m.augment, 8), 1: (m.mean, m.std, None, 8)}, seed=0)
    ids = torch.tensor([0, 1] * 5)
    out = aug(expected, ids)
    assert torch.equal(out[1::2], expected[1::2]) and not torch.allclose(out[0::2], expected[0::2])
    with pytest.raises(KeyError, match="task id 2"):
        aug(expected, torch.full((10,), 2))
