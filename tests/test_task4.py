"""Task 4: the transfer model, its weights (offline), the resize, task4a end to end and task4b's figures."""
import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import dataloaders
import task4a
import task4b
import utils


def test_only_layer4_and_fc_learn():
    model = task4a.TransferResNet18(num_classes=10)
    trainable, total = task4a.count_parameters(model)
    assert trainable == 8_398_858 and total == 11_181_642
    learning = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert learning == {"layer4", "fc"}
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_a_local_weights_file_is_really_loaded(tmp_path):
    reference = torchvision.models.resnet18()  # random weights, saved as torchvision's file would be
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    model = task4a.build_model(weights_path=str(path))
    for name, value in reference.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model.state_dict()[name], value), name
    assert model.fc.out_features == 10


def test_a_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(utils.UserError, match="not a state dict of torchvision's ResNet18"):
        task4a.build_model(weights_path=str(path))
    with pytest.raises(utils.UserError, match="no such file"):
        task4a.build_model(weights_path=str(tmp_path / "missing.pth"))


def test_a_failed_download_says_where_the_file_goes_and_names_the_flag(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(utils.UserError) as error:
        task4a.build_model()
    message = str(error.value)
    assert task4a.cached_weights_path() in message and "resnet18-f37072fd.pth" in message
    assert "--weights" in message and "URLError" in message and "\n" not in message


def test_frozen_batch_norms_can_keep_imagenet_statistics():
    for keep in (False, True):
        model = task4a.TransferResNet18(keep_imagenet_bn_stats=keep).train()
        before = model.bn1.running_mean.clone(), model.layer4[0].bn1.running_mean.clone()
        model(torch.randn(4, 3, 64, 64) + 3)
        assert torch.equal(model.bn1.running_mean, before[0]) is keep
        assert not torch.equal(model.layer4[0].bn1.running_mean, before[1])  # layer4 always adapts
        assert model.layer4.training and model.fc.training


def test_on_device_resize_gives_the_size_asked(pickled_dir):
    train, val, _ = dataloaders.load_cifar10(8, data_dir=pickled_dir, device="cpu", image_size=56,
                                             mean=task4a.IMAGENET_MEAN, std=task4a.IMAGENET_STD)
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 56, 56) and labels.shape == (8,)
    assert next(iter(val))[0].shape[-2:] == (56, 56)
    assert train.evaluation_view(8).image_size == 56
    # A constant image stays that constant when enlarged.
    image, label = torch.full((1, 3, 32, 32), 51, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    loader = dataloaders.DeviceLoader(image, label, 1, mean=(0.2,) * 3, std=(1.0,) * 3, image_size=224)
    torch.testing.assert_close(next(iter(loader))[0], torch.zeros(1, 3, 224, 224), atol=1e-6, rtol=0)


def test_task4a_end_to_end_on_tiny_data(tmp_path, monkeypatch, pickled_dir, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="random weights"):
        trainer = task4a.main(["--data-dir", str(pickled_dir), "--no-pretrained", "--image-size", "32",
                               "--epochs", "1", "--batch-size", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "8,398,858 of 11,181,642 parameters trainable" in out
    assert f"test accuracy: {trainer.final['test_accuracy']:.4f} (random initial weights" in out
    results = json.loads((tmp_path / "results/task4a.json").read_text())
    assert results["optimizer"]["name"] == "Adam" and results["optimizer"]["lr"] == 5e-4
    assert results["settings"]["image_size"] == 32 and results["settings"]["no_pretrained"] is True
    assert (tmp_path / "plots/task4a_plot.png").is_file()
    assert (tmp_path / "checkpoints/task4a/best.ckpt").is_file()
    # --resume reaches task4a's Trainer: the finished run is reported and left as it is.
    with pytest.warns(UserWarning, match="random weights"):
        again = task4a.main(["--data-dir", str(pickled_dir), "--no-pretrained", "--image-size", "32",
                             "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--resume"])
    assert "task4a: finished already" in capsys.readouterr().out and again.final == trainer.final


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "zebra.jpg"
    Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)).save(path)
    return path


def test_task4b_makes_both_figures_from_a_task4a_checkpoint(tmp_path, monkeypatch, image_file, capsys):
    monkeypatch.chdir(tmp_path)
    model = task4a.TransferResNet18(num_classes=10)
    utils.save_checkpoint({"model": model.state_dict()}, tmp_path / "checkpoints/task4a/best.ckpt")
    first, last = task4b.main(["--image", str(image_file), "--device", "cpu"])
    assert first.shape == (1, 64, 112, 112) and last.shape == (1, 512, 7, 7)
    assert "(1, 512, 7, 7)" in capsys.readouterr().out
    image = task4b.load_image(image_file)
    torch.testing.assert_close(first, model.eval().conv1(image))
    for name in ("task4b.png", "task4c.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000


def test_task4b_uses_imagenet_weights_without_a_checkpoint(tmp_path, monkeypatch, image_file, capsys):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "resnet18.pth"
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), weights)
    first, _ = task4b.main(["--image", str(image_file), "--weights", str(weights), "--filters", "0", "63",
                            "--device", "cpu"])
    assert "ImageNet weights" in capsys.readouterr().out
    torch.testing.assert_close(first, reference.eval().conv1(task4b.load_image(image_file)))


def test_task4b_missing_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match="zebra.jpg into images/"):
        task4b.main([])
    assert not (tmp_path / "plots").exists()
