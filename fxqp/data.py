"""Data sets that ship inside packages, for the demo, ``fxqp train`` and the tutorials.

Nothing here downloads anything:

* :func:`digits` — scikit-learn's bundled ``load_digits`` (1,797 grey 8×8 digits, 10
  classes), split once into 75% train / 25% test, stratified, with a fixed seed.
* :func:`super_resolution` — ×``scale`` super-resolution on the luminance of scikit-image's
  bundled sample photographs: training pairs are low/high-resolution patches of
  :data:`SR_TRAIN_IMAGES`, the test set is the whole of :data:`SR_TEST_IMAGES` (held out).
* :func:`image_folder` — classification from ``PATH/<class>/<image>`` files.

Every loader returns a :class:`TaskData`: float32 tensors, images as ``N×C×H×W`` in [0, 1].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fxqp._extras import require
from fxqp.errors import FxqpError

__all__ = [
    "DataError",
    "TaskData",
    "digits",
    "super_resolution",
    "image_folder",
    "load_data",
    "validation_split",
    "psnr",
    "DATA_NAMES",
    "SR_TRAIN_IMAGES",
    "SR_TEST_IMAGES",
]

#: scikit-image sample images whose patches train the super-resolution networks.
SR_TRAIN_IMAGES = ("camera", "astronaut", "coffee", "chelsea")
#: scikit-image sample images held out to measure PSNR.
SR_TEST_IMAGES = ("rocket", "coins", "moon")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


class DataError(FxqpError):
    """A data set argument or a data folder that cannot be used."""


@dataclass(frozen=True)
class TaskData:
    """A supervised task with a fixed train/test split.

    Attributes:
        name: short name (``digits``, ``sr3``, ``folder:<path>``).
        kind: ``classification`` (targets are class indices, metric accuracy in %) or
            ``super_resolution`` (targets are high-resolution images, metric PSNR in dB).
        train_x, train_y, test_x, test_y: the tensors. For super-resolution, ``test_x`` and
            ``test_y`` are lists of whole images of different sizes.
        classes: class names (classification).
        scale: the upscaling factor (super-resolution).
    """

    name: str
    kind: str
    train_x: Tensor
    train_y: Tensor
    test_x: Any
    test_y: Any
    classes: Sequence[str] = field(default=())
    scale: int = 1

    @property
    def metric(self) -> str:
        """Name of the quality metric: ``accuracy %`` or ``PSNR dB`` (higher is better)."""
        return "accuracy %" if self.kind == "classification" else "PSNR dB"

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def digits(test_fraction: float = 0.25, seed: int = 0) -> TaskData:
    """scikit-learn's 8×8 digits as ``N×1×8×8`` floats in [0, 1] (pixel / 16).

    The split is stratified by class and fixed by ``seed`` (``train_test_split``).
    """
    load_digits = require("sklearn.datasets", "the digits data set").load_digits
    train_test_split = require("sklearn.model_selection", "the digits data set").train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed, stratify=bunch.target)
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return TaskData(
        "digits", "classification", x[idx_train], y[idx_train], x[idx_test], y[idx_test], classes=[str(c) for c in bunch.target_names]
    )


def _luminance(name: str) -> Tensor:
    """The luminance (ITU-R BT.601 Y, in [0, 1]) of scikit-image sample image ``name``."""
    require("skimage", "the super-resolution data set")
    import skimage.color
    import skimage.data

    try:
        image = getattr(skimage.data, name)()
    except AttributeError:
        raise DataError(f"super-resolution: scikit-image has no bundled sample image {name!r}") from None
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])  # float in [0, 1]
        return torch.tensor(image, dtype=torch.float32)
    return torch.tensor(image, dtype=torch.float32) / 255.0


def _downscale(hr: Tensor, scale: int) -> Tensor:
    """Bicubic, anti-aliased downscaling by ``scale`` of ``N×1×H×W`` (H, W multiples of scale)."""
    h, w = hr.shape[-2:]
    return F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)


def _crop_to_multiple(image: Tensor, scale: int) -> Tensor:
    h, w = image.shape[-2:]
    return image[..., : h - h % scale, : w - w % scale]


def super_resolution(
    scale: int = 3,
    patch: int = 11,
    stride: int | None = 5,
    train_images: Sequence[str] = SR_TRAIN_IMAGES,
    test_images: Sequence[str] = SR_TEST_IMAGES,
) -> TaskData:
    """×``scale`` super-resolution pairs from scikit-image's bundled photographs.

    Training: high-resolution patches of ``patch·scale`` pixels (taken every ``stride·scale``
    pixels; ``None``: ``stride = patch``) of each training image's luminance, and their
    bicubic, anti-aliased downscaled ``patch×patch`` inputs. Test: the held-out images whole
    (cropped to a multiple of ``scale``), as lists of ``1×1×h×w`` low- and ``1×1×H×W``
    high-resolution tensors.
    """
    if scale not in (2, 3, 4):
        raise DataError(f"super-resolution: scale must be 2, 3 or 4, got {scale}")
    if patch < 4:
        raise DataError(f"super-resolution: patch must be at least 4 low-resolution pixels, got {patch}")
    stride = patch if stride is None else stride
    size, step = patch * scale, stride * scale
    hr_patches = []
    for name in train_images:
        image = _luminance(name)[None, None]
        tiles = image.unfold(2, size, step).unfold(3, size, step)  # 1×1×nh×nw×size×size
        hr_patches.append(tiles.reshape(-1, 1, size, size))
    train_y = torch.cat(hr_patches)
    train_x = _downscale(train_y, scale)
    test_y = [_crop_to_multiple(_luminance(name)[None, None], scale) for name in test_images]
    test_x = [_downscale(hr, scale) for hr in test_y]
    return TaskData(f"sr{scale}", "super_resolution", train_x, train_y, test_x, test_y, scale=scale)


def _class_dirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise DataError(f"folder:{path}: no such directory (expected PATH/<class>/<image files>)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"folder:{path}: found {len(classes)} class folder(s); expected at least 2 sub-folders, one per class, holding images"
        )
    return classes


def image_folder(path: str, size: int = 32, test_fraction: float = 0.2, seed: int = 0, grey: bool = False) -> TaskData:
    """Classification from ``path/<class>/<image>`` (png, jpg, bmp, tif, gif).

    Images are read with scikit-image, converted to RGB (or grey with ``grey=True``) and
    resized to ``size×size``; the split is stratified and fixed by ``seed``.
    """
    require("skimage", "folder: data")
    train_test_split = require("sklearn.model_selection", "folder: data").train_test_split
    import numpy as np
    import skimage.color
    import skimage.io
    import skimage.transform

    classes = _class_dirs(path)
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(path, cls)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"folder:{path}: class folder {cls!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            file = os.path.join(folder, f)
            try:
                image = skimage.io.imread(file)
            except Exception as err:  # noqa: BLE001 - any decoder failure names the file
                raise DataError(f"folder:{path}: cannot read image {file!r} ({type(err).__name__}: {err})") from None
            image = np.asarray(image)
            if image.ndim == 3 and image.shape[-1] == 4:
                image = skimage.color.rgba2rgb(image)
            if grey:
                image = skimage.color.rgb2gray(image) if image.ndim == 3 else image
            elif image.ndim == 2:
                image = skimage.color.gray2rgb(image)
            image = skimage.transform.resize(image, (size, size), anti_aliasing=True)  # float in [0, 1]
            images.append(torch.tensor(image, dtype=torch.float32).reshape(size, size, -1).permute(2, 0, 1))
            labels.append(label)
    counts = torch.bincount(torch.tensor(labels))
    if int(counts.min()) < 2:
        small = classes[int(counts.argmin())]
        raise DataError(
            f"folder:{path}: class {small!r} has {int(counts.min())} image; every class needs at least 2 (one to train, one to test)"
        )
    x, y = torch.stack(images), torch.tensor(labels)
    n_test = max(len(classes), math.ceil(test_fraction * len(y)))
    idx_train, idx_test = train_test_split(range(len(y)), test_size=n_test, random_state=seed, stratify=labels)
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    return TaskData(f"folder:{path}", "classification", x[idx_train], y[idx_train], x[idx_test], y[idx_test], classes=classes)


def validation_split(data: TaskData, fraction: float = 0.2, seed: int = 0) -> TaskData:
    """The task with ``fraction`` of its *training* set held out as its test set, for
    choices (searches) that must not look at the real test set.

    Classification: a split stratified by class (``train_test_split``). Super-resolution:
    a random split of the training patches, the held-out ones in chunks of up to 256
    (:func:`fxqp.experiment.measure` averages the PSNR over chunks). Fixed by ``seed``.
    """
    import dataclasses

    train_test_split = require("sklearn.model_selection", "a validation split").train_test_split

    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction: {fraction!r} is not accepted; expected a number in (0, 1)")
    n = len(data.train_y)
    stratify = data.train_y.tolist() if data.kind == "classification" else None
    try:
        idx_train, idx_val = train_test_split(range(n), test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise DataError(f"{data.name}: cannot hold out {fraction:.0%} of {n} training samples for validation ({err})") from None
    idx_train, idx_val = torch.tensor(sorted(idx_train)), torch.tensor(sorted(idx_val))
    val_x, val_y = data.train_x[idx_val], data.train_y[idx_val]
    if data.kind != "classification":
        val_x, val_y = list(val_x.split(256)), list(val_y.split(256))
    return dataclasses.replace(
        data, name=f"{data.name} (validation)", train_x=data.train_x[idx_train], train_y=data.train_y[idx_train], test_x=val_x, test_y=val_y
    )


#: Data set names :func:`load_data` accepts (besides ``folder:PATH``).
DATA_NAMES: dict[str, Callable[[], TaskData]] = {
    "digits": digits,
    "sr": super_resolution,
    "sr2": lambda: super_resolution(scale=2),
    "sr3": lambda: super_resolution(scale=3),
}


def load_data(name: str) -> TaskData:
    """``digits``, ``sr`` (= ``sr3``), ``sr2``, ``sr3`` or ``folder:PATH``."""
    if name.startswith("folder:"):
        return image_folder(name.removeprefix("folder:"))
    if name not in DATA_NAMES:
        raise DataError(f"--data {name!r}: expected one of {', '.join(DATA_NAMES)} or folder:PATH")
    return DATA_NAMES[name]()


def psnr(output: Tensor, target: Tensor, border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]:
    ``10·log10(1 / mean((clamp(output, 0, 1) − target)²))``, ignoring ``border`` pixels on
    each side (the usual super-resolution convention crops ``scale`` pixels)."""
    if border:
        output = output[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    mse = float((output.clamp(0, 1) - target).pow(2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))
