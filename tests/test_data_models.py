"""Bundled data sets and the built-in models of the demo and ``fxqp train``."""

import math

import pytest
import torch
from torch import nn

from fxqp.data import DataError, digits, image_folder, load_data, psnr, super_resolution
from fxqp.models import ESPCN, DigitsNet, ModelError, build_model


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = digits(), digits()
    assert a.train_x.shape == (1347, 1, 8, 8) and a.test_x.shape == (450, 1, 8, 8)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert 0.0 <= float(a.train_x.min()) and float(a.train_x.max()) == 1.0
    counts = torch.bincount(a.test_y, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47  # ~10% of 450 per class
    assert a.kind == "classification" and a.metric == "accuracy %" and len(a.classes) == 10


def test_super_resolution_pairs_are_downscaled_patches_and_tests_held_out():
    data = super_resolution(scale=3, patch=8, stride=8)
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_y.shape[1:] == (1, 24, 24)
    # camera is 512x512: floor((512 - 24) / 24) + 1 = 21 patches per side
    assert data.train_x.shape[0] >= 21 * 21
    assert len(data.test_x) == 3
    for lr, hr in zip(data.test_x, data.test_y):
        assert hr.shape[-2] == 3 * lr.shape[-2] and hr.shape[-1] == 3 * lr.shape[-1]
    # the low-resolution input is the area-like average of its high-resolution patch
    hr = data.train_y[:16]
    coarse = torch.nn.functional.avg_pool2d(hr, 3)
    assert float((data.train_x[:16] - coarse).abs().mean()) < 0.05


def test_psnr_formula():
    target = torch.zeros(1, 1, 4, 4)
    out = torch.full((1, 1, 4, 4), 0.1)
    assert psnr(out, target) == pytest.approx(10 * math.log10(1 / 0.01))
    assert psnr(torch.full_like(target, 2.0), target + 1) > 100  # clamped to [0, 1]: exact


def test_bad_data_names_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="--data 'mnist'"):
        load_data("mnist")
    with pytest.raises(DataError, match="no such directory"):
        load_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="at least 2 sub-folders"):
        image_folder(str(tmp_path))
    with pytest.raises(DataError, match="scale must be 2, 3 or 4"):
        super_resolution(scale=5)


def test_image_folder_reads_classes(tmp_path):
    import numpy as np
    import skimage.io

    rng = np.random.default_rng(0)
    for cls, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(5):
            image = np.clip(rng.normal(value, 5, size=(12, 10, 3)), 0, 255).astype(np.uint8)
            skimage.io.imsave(tmp_path / cls / f"{i}.png", image, check_contrast=False)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = load_data(f"folder:{tmp_path}")
    assert data.classes == ["cats", "dogs"]
    assert data.train_x.shape[1:] == (3, 32, 32) and len(data.train_y) + len(data.test_y) == 10
    assert set(data.test_y.tolist()) == {0, 1}
    dark = data.train_x[data.train_y == 0].mean()
    bright = data.train_x[data.train_y == 1].mean()
    assert float(dark) < 0.3 < float(bright)


def test_builtin_models_shapes():
    assert DigitsNet()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert ESPCN(scale=3)(torch.randn(2, 1, 7, 9)).shape == (2, 1, 21, 27)
    assert build_model("digits-cnn", num_classes=4, in_channels=3)(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_model_factories_and_errors():
    model = build_model("torchvision:resnet18", num_classes=3)
    assert model.fc.out_features == 3
    assert isinstance(build_model("torch.nn:Identity"), nn.Identity)  # no num_classes parameter: not passed
    with pytest.raises(ModelError, match="torchvision has no model 'resnet0'"):
        build_model("torchvision:resnet0")
    with pytest.raises(ModelError, match="cannot import module 'no_such_module'"):
        build_model("no_such_module:factory")
    with pytest.raises(ModelError, match="expected one of digits-cnn, digits-vgg, espcn"):
        build_model("resnet18")
    with pytest.raises(ModelError, match="returned object, expected a torch.nn.Module"):
        build_model("builtins:object", num_classes=3)
    with pytest.raises(ModelError, match="building the model failed"):
        build_model("math:floor", num_classes=3)
