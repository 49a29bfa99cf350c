"""The data path: both layouts, the cache, the split, normalisation, augmentation, batching."""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import dataloaders
import utils


def load(data_dir, batch_size=16, **kwargs):
    return dataloaders.load_cifar10(batch_size, data_dir=data_dir, device="cpu", **kwargs)


def all_batches(loader):
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_both_layouts_give_the_same_tensors(pickled_dir, folder_dir, tiny_arrays):
    (train_images, train_labels), (test_images, test_labels) = tiny_arrays
    from_pickles = dataloaders.read_cifar10(pickled_dir)
    from_folders = dataloaders.read_cifar10(folder_dir)
    assert from_pickles[4] == from_folders[4] == sorted(from_pickles[4])
    for a, b in zip(from_pickles[:4], from_folders[:4], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(from_pickles[0], torch.from_numpy(train_images).permute(0, 3, 1, 2))
    assert torch.equal(from_pickles[1], torch.from_numpy(train_labels))
    assert torch.equal(from_pickles[3], torch.from_numpy(test_labels))
    assert from_pickles[0].dtype == torch.uint8 and from_pickles[1].dtype == torch.int64


def test_batches_folder_itself_is_accepted(pickled_dir):
    images = dataloaders.read_cifar10(pickled_dir / "cifar-10-batches-py")[0]
    assert images.shape == (400, 3, 32, 32)


def test_image_folder_is_cached_and_the_cache_follows_changes(tmp_path, tiny_arrays, monkeypatch):
    from conftest import write_image_folder

    write_image_folder(tmp_path, *tiny_arrays)
    first = dataloaders.read_cifar10(tmp_path)
    cache = tmp_path / dataloaders.CACHE_NAME
    assert cache.is_file()

    def no_decoding(entries):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(dataloaders, "decode_images", no_decoding)
    second = dataloaders.read_cifar10(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4], strict=True))

    monkeypatch.undo()
    changed = tmp_path / "train" / "cat" / "0000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse-grained file systems
    third = dataloaders.read_cifar10(tmp_path)
    index = 3 * 40  # first cat
    assert third[0][index].sum() == 0 and first[0][index].sum() > 0


def test_wrong_image_size_is_a_clear_error(tmp_path, tiny_arrays):
    from conftest import write_image_folder

    write_image_folder(tmp_path, *tiny_arrays)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "test" / "dog" / "big.png")
    with pytest.raises(dataloaders.DatasetNotFoundError, match=r"big.png' is 24x20 pixels"):
        dataloaders.read_cifar10(tmp_path)


def test_missing_dataset_offline_names_folder_layouts_and_flag(tmp_path, offline):
    with pytest.raises(dataloaders.DatasetNotFoundError) as error:
        load(tmp_path / "nowhere")
    message = str(error.value)
    assert "nowhere" in message and "cifar-10-batches-py" in message
    assert "train/<class>" in message and "--data-dir" in message and "URLError" in message
    assert "\n" not in message
    assert isinstance(error.value, utils.UserError)


def test_values_match_torchvision_transforms(folder_dir):
    _, val, test = load(folder_dir, mean=dataloaders.COURSE_MEAN, std=dataloaders.COURSE_STD)
    images, labels = all_batches(test)
    reference = T.Compose([T.ToTensor(), T.Normalize(dataloaders.COURSE_MEAN, dataloaders.COURSE_STD)])
    for index, name in ((0, "airplane/0000.png"), (37, "cat/0007.png"), (99, "truck/0009.png")):
        expected = reference(Image.open(folder_dir / "test" / name).convert("RGB"))
        assert torch.equal(images[index], expected)
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = next(iter(load(folder_dir, **imagenet)[2]))[0]
    expected = T.Compose([T.ToTensor(), T.Normalize(**imagenet)])(Image.open(folder_dir / "test/airplane/0000.png"))
    torch.testing.assert_close(images[0], expected, rtol=0, atol=1e-6)


def test_split_is_disjoint_complete_and_fixed_by_its_own_seed(pickled_dir):
    train_index, val_index = dataloaders.split_indices(400, 0.1, split_seed=0)
    assert len(val_index) == 40 and len(train_index) == 360
    assert set(train_index.tolist()).isdisjoint(val_index.tolist())
    assert set(train_index.tolist()) | set(val_index.tolist()) == set(range(400))
    assert torch.equal(val_index, dataloaders.split_indices(400, 0.1, split_seed=0)[1])
    assert not torch.equal(val_index, dataloaders.split_indices(400, 0.1, split_seed=1)[1])

    # The training seed changes the shuffle but not which images are held out.
    val_a = all_batches(load(pickled_dir, seed=0)[1])[0]
    val_b = all_batches(load(pickled_dir, seed=5)[1])[0]
    val_c = all_batches(load(pickled_dir, seed=0, split_seed=3)[1])[0]
    assert torch.equal(val_a, val_b) and not torch.equal(val_a, val_c)
    with pytest.raises(utils.UserError):
        dataloaders.split_indices(400, 1.0, 0)


def test_loaders_behave_like_dataloaders(pickled_dir):
    train, val, test = load(pickled_dir, batch_size=64)
    assert len(train) == 360 // 64 == 5  # the last partial batch is dropped
    batches = list(train)
    assert len(batches) == 5 and all(x.shape == (64, 3, 32, 32) and y.shape == (64,) for x, y in batches)
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    first_epoch = torch.cat([y for _, y in batches])
    assert not torch.equal(first_epoch, torch.cat([y for _, y in train]))  # reshuffled
    assert len(torch.unique(torch.cat([x for x, _ in batches]).flatten(1), dim=0)) == 320  # no repeats
    # Validation and test: every image once, in order, a smaller last batch included.
    assert len(val) == 1 and sum(len(y) for _, y in val) == 40
    assert sum(len(y) for _, y in test) == 100
    assert torch.equal(all_batches(test)[1], torch.arange(10).repeat_interleave(10))
    assert val.classes == train.classes == test.classes and len(train.classes) == 10


def test_a_single_batch_smaller_than_batch_size_is_kept(pickled_dir):
    train = load(pickled_dir, batch_size=1000)[0]
    assert len(train) == 1 and len(next(iter(train))[1]) == 360


def test_same_seed_same_epochs(pickled_dir):
    a, b = load(pickled_dir, seed=7, augment=True)[0], load(pickled_dir, seed=7, augment=True)[0]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_keeps_shapes_and_labels_and_changes_images(pickled_dir):
    plain, val, _ = load(pickled_dir, batch_size=360, seed=3)
    augmented, val_aug, _ = load(pickled_dir, batch_size=360, seed=3, augment=True)
    (x, y), (xa, ya) = next(iter(plain)), next(iter(augmented))
    assert torch.equal(y, ya) and xa.shape == x.shape and xa.dtype == x.dtype
    changed = (xa != x).flatten(1).any(1).float().mean().item()
    assert changed > 0.9  # 1 in 162 images draws no shift and no flip
    # Validation is never augmented, even when training is.
    assert torch.equal(all_batches(val)[0], all_batches(val_aug)[0])
    assert not val_aug.augment and not val_aug.shuffle


def test_random_crop_and_flip_match_a_per_image_crop_then_flip():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [4, 4], [8, 8], [0, 8], [2, 5], [8, 1]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = dataloaders.random_crop_and_flip(images, shifts, flips, padding=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i, (dy, dx) in enumerate(shifts.tolist()):
        crop = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
    assert torch.equal(out[2, :, :4, :4], images[2, :, 4:, 4:])  # the extreme shift keeps a quarter
    assert torch.equal(out[1], images[1].flip(2))  # no shift, mirrored


def test_smaller_crops_are_parts_of_the_padded_image_at_its_scale():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [3, 1], [6, 6], [2, 5]])  # up to padded side 10 - crop side 4
    flips = torch.tensor([False, True, False, True])
    out = dataloaders.random_crop_and_flip(images, shifts, flips, 1, "reflect", size=4)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    assert out.shape == (4, 3, 4, 4)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        crop = padded[i, :, dy:dy + 4, dx:dx + 4]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)


def test_crop_sizes_set_each_epochs_crops_then_whole_images_follow(pickled_dir):
    loader = load(pickled_dir, batch_size=90, seed=3, augment=True, crop_padding=2, padding_mode="reflect",
                  crop_sizes=[24, 28])[0]
    plain = load(pickled_dir, batch_size=90, seed=3)[0]
    every_label = sorted(all_batches(plain)[1].tolist())
    sides = []
    for _ in range(3):
        images, labels = all_batches(loader)
        sides.append(images.shape[-1])
        assert images.shape[:2] == (len(labels), 3) and sorted(labels.tolist()) == every_label
    assert sides == [24, 28, 32] and loader.crop_size(7) == 32
    # A crop is a window of its image at the same scale: some window of the padded original equals it.
    loader = dataloaders.DeviceLoader(plain.images[:8], torch.arange(8), 8, mean=(0.5,) * 3, std=(0.25,) * 3,
                                      shuffle=True, augment=True, crop_padding=2, padding_mode="reflect",
                                      crop_sizes=[20], seed=0)
    x, y = next(iter(loader))
    padded = torch.nn.functional.pad(loader.to_model_input(plain.images[:8].clone()), (2,) * 4, mode="reflect")
    for crop, i in zip(x, y.tolist(), strict=True):
        windows = [padded[i, :, r:r + 20, c:c + 20] for r in range(17) for c in range(17)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)
    with pytest.raises(ValueError, match="crop_sizes"):
        dataloaders.DeviceLoader(plain.images, plain.labels, 8, mean=(0.5,) * 3, std=(0.25,) * 3, augment=True,
                                 crop_padding=2, crop_sizes=[37])


def test_reflected_translation_moves_images_and_keeps_labels_and_shapes(pickled_dir):
    plain = load(pickled_dir, batch_size=360, seed=3)[0]
    moved = load(pickled_dir, batch_size=360, seed=3, augment=True, crop_padding=2, padding_mode="reflect")[0]
    (x, y), (xm, ym) = next(iter(plain)), next(iter(moved))
    assert torch.equal(y, ym) and xm.shape == x.shape
    assert (xm != x).flatten(1).any(1).float().mean().item() > 0.9
    # Each image is its reflect-padded self, cropped: its own pixels mirrored at the border, no black edge.
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    shifts, flips = torch.tensor([[0, 4], [2, 2], [4, 0], [1, 3]]), torch.tensor([False, True, False, True])
    out = dataloaders.random_crop_and_flip(images, shifts, flips, 2, "reflect")
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i, (dy, dx) in enumerate(shifts.tolist()):
        crop = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
    assert torch.equal(out[0, :, 2:, :6], images[0, :, :6, 2:])  # content moved down 2 rows, left 2 columns
    assert torch.equal(out[0, :, 0, :6], images[0, :, 2, 2:])  # the top row mirrors row 2 of the image


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    loader = dataloaders.DeviceLoader(images, torch.arange(64), 64, mean=(0.5,) * 3, std=(0.25,) * 3,
                                      shuffle=True, augment=True, crop_padding=0, flip="alternate", seed=1)
    as_input = loader.to_model_input(images.clone())
    flipped = []
    for _ in range(4):
        x, y = next(iter(loader))
        mirrored = torch.tensor([torch.equal(x[i], as_input[y[i]].flip(-1)) for i in range(64)])
        assert torch.equal(~mirrored, torch.tensor([torch.equal(x[i], as_input[y[i]]) for i in range(64)]))
        flipped.append(mirrored[y.argsort()])
    assert 0.2 < flipped[0].float().mean() < 0.8  # a coin per image in the first epoch
    assert torch.equal(flipped[1], ~flipped[0]) and torch.equal(flipped[2], flipped[0])
    assert torch.equal(flipped[3], ~flipped[0])


def test_a_broken_cache_is_rebuilt(tmp_path, tiny_arrays):
    from conftest import write_image_folder

    write_image_folder(tmp_path, *tiny_arrays)
    (tmp_path / dataloaders.CACHE_NAME).write_bytes(b"half a cache")
    images = dataloaders.read_cifar10(tmp_path)[0]
    assert images.shape == (400, 3, 32, 32)
    assert torch.load(tmp_path / dataloaders.CACHE_NAME, weights_only=True)["train_images"].shape == (400, 3, 32, 32)


def test_broken_batch_files_are_a_clear_error(tmp_path, tiny_arrays):
    from conftest import write_pickled_batches

    write_pickled_batches(tmp_path, *tiny_arrays)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04 cut off")
    with pytest.raises(dataloaders.DatasetNotFoundError, match="missing or broken CIFAR-10 file"):
        dataloaders.read_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(dataloaders.DatasetNotFoundError, match="delete the folder"):
        dataloaders.read_cifar10(tmp_path)
