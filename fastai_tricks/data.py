"""Imagenette data: the real download path, and an offline look-alike for demos and tests.

``make_fake_imagenette`` draws a small data set laid out exactly like
Imagenette (``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``) so that every
recipe, test and gallery example runs offline. ``imagenette_path`` is the real
loading path: a local folder if given, otherwise fastai's ``untar_data``.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._checks import check_choice, check_non_negative_int, check_positive_int

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_WNIDS",
    "DataUnavailableError",
    "imagenette_path",
    "make_digits",
    "make_fake_imagenette",
    "make_fake_segmentation",
    "SEGMENTATION_CODES",
]

#: Imagenette's ten ImageNet wnids, in the order fastai's folder loader sorts them.
IMAGENETTE_WNIDS: tuple[str, ...] = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888605",
)

#: Human-readable names of the ten classes, keyed by wnid.
IMAGENETTE_CLASSES: dict[str, str] = dict(
    zip(
        IMAGENETTE_WNIDS,
        (
            "tench",
            "English springer",
            "cassette player",
            "chain saw",
            "church",
            "French horn",
            "garbage truck",
            "gas pump",
            "golf ball",
            "parachute",
        ),
        strict=True,
    )
)

_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataUnavailableError(RuntimeError):
    """Raised when a data set cannot be found locally nor downloaded."""


# --- drawing ---------------------------------------------------------------------------------------
# Each class is a pattern drawn at a random position, scale and rotation on a noisy gradient
# background. Colour is only a weak cue (hue windows of classes overlap), so a model has to learn
# shape and texture; the noise and random placement keep a small CNN from solving it at once.

_Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, tuple[float, float], float, tuple[int, ...]], None]


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _paint_disc(d, rng, c, r, col):
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=col)


def _paint_square(d, rng, c, r, col):
    d.polygon(_polygon(c[0], c[1], r, 4, rng.uniform(0, math.pi / 2)), fill=col)


def _paint_triangle(d, rng, c, r, col):
    d.polygon(_polygon(c[0], c[1], r, 3, rng.uniform(0, 2 * math.pi)), fill=col)


def _paint_ring(d, rng, c, r, col):
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=col, width=max(2, int(r * 0.3)))


def _paint_cross(d, rng, c, r, col):
    w = max(2, int(r * 0.35))
    d.line([c[0] - r, c[1], c[0] + r, c[1]], fill=col, width=w)
    d.line([c[0], c[1] - r, c[0], c[1] + r], fill=col, width=w)


def _paint_star(d, rng, c, r, col):
    phase = rng.uniform(0, 2 * math.pi)
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.4
        a = phase + math.pi * k / 5
        pts.append((c[0] + rad * math.cos(a), c[1] + rad * math.sin(a)))
    d.polygon(pts, fill=col)


def _stripes(d, rng, c, r, col, horizontal: bool):
    step = max(3, int(r * rng.uniform(0.25, 0.4)))
    x0, y0, x1, y1 = c[0] - r, c[1] - r, c[0] + r, c[1] + r
    pos = x0 if not horizontal else y0
    end = x1 if not horizontal else y1
    while pos < end:
        if horizontal:
            d.rectangle([x0, pos, x1, pos + step // 2], fill=col)
        else:
            d.rectangle([pos, y0, pos + step // 2, y1], fill=col)
        pos += step


def _paint_hstripes(d, rng, c, r, col):
    _stripes(d, rng, c, r, col, horizontal=True)


def _paint_vstripes(d, rng, c, r, col):
    _stripes(d, rng, c, r, col, horizontal=False)


def _paint_checker(d, rng, c, r, col):
    cells = int(rng.integers(3, 6))
    side = 2 * r / cells
    for i in range(cells):
        for j in range(cells):
            if (i + j) % 2 == 0:
                x, y = c[0] - r + i * side, c[1] - r + j * side
                d.rectangle([x, y, x + side, y + side], fill=col)


def _paint_dots(d, rng, c, r, col):
    dots = int(rng.integers(3, 5))
    side = 2 * r / dots
    for i in range(dots):
        for j in range(dots):
            x, y = c[0] - r + (i + 0.5) * side, c[1] - r + (j + 0.5) * side
            d.ellipse([x - side * 0.25, y - side * 0.25, x + side * 0.25, y + side * 0.25], fill=col)


_PAINTERS: tuple[_Painter, ...] = (
    _paint_disc,
    _paint_square,
    _paint_triangle,
    _paint_ring,
    _paint_cross,
    _paint_star,
    _paint_hstripes,
    _paint_vstripes,
    _paint_checker,
    _paint_dots,
)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3)


def _class_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    """A random foreground colour whose hue leans towards the class's own.

    Hue windows of neighbouring classes overlap, so colour alone cannot separate
    the classes; it only gives a short fit a foothold before shape is learned.
    """
    hue = (label / len(_PAINTERS) + rng.uniform(-0.12, 0.12)) % 1.0
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def _nominal_dims(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Draw a (width, height) whose short side is 0.8 to 1 times ``size``, landscape or portrait."""
    short = int(round(size * rng.uniform(0.8, 1.0)))
    aspect = rng.uniform(1.0, 1.5)
    if rng.random() < 0.5:
        return int(round(short * aspect)), short
    return short, int(round(short * aspect))


def _full_size_dims(rng: np.random.Generator) -> tuple[int, int]:
    """Draw a (width, height) like Imagenette's full-size images (ImageNet's originals).

    Most are 500 px on the long side at 4:3 or 3:2; one in ten is larger, up to 4000 px.
    """
    u = rng.random()
    long = 500 if u < 0.9 else int(rng.integers(600, 1601)) if u < 0.98 else int(rng.integers(2000, 4001))
    short = int(round(long / (4 / 3 if rng.random() < 0.6 else 3 / 2)))
    return (long, short) if rng.random() < 0.75 else (short, long)


def _draw_image(rng: np.random.Generator, label: int, dims: tuple[int, int]) -> Image.Image:
    """Draw one image of class ``label`` of size ``dims`` (width, height)."""
    w, h = dims
    # Background: a linear gradient between two random colours plus noise.
    # A dim, greyish background keeps the coloured pattern visible.
    c0, c1 = _random_colour(rng) * 0.45, _random_colour(rng) * 0.45
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h)
    grad = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    bg = np.broadcast_to(grad[None, :, :], (h, w, 3)) if len(t) == w else np.broadcast_to(grad[:, None, :], (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fg = _class_colour(rng, label)
    # One or two copies of the class pattern, so the signal is strong enough for a short fit.
    for _ in range(int(rng.integers(1, 3))):
        r = min(w, h) * rng.uniform(0.22, 0.4)
        centre = (rng.uniform(r, w - r), rng.uniform(r, h - r))
        _PAINTERS[label](draw, rng, centre, r, tuple(int(v) for v in fg))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(3.0, 12.0), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_fake_imagenette(
    path: str | Path,
    n_train: int = 30,
    n_valid: int = 10,
    size: int = 160,
    seed: int = 0,
    full_size: bool = False,
) -> Path:
    """Write a small, offline, Imagenette-shaped image data set.

    The folder tree is ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` with
    Imagenette's ten real wnids, so ``ImageDataLoaders.from_folder(path,
    valid='val')`` and every recipe in this package load it unchanged. Each
    class is a procedurally drawn pattern (disc, square, triangle, ring, cross,
    star, horizontal stripes, vertical stripes, checkerboard, dots) at random
    positions and scales, in random colours whose hue leans towards the class's
    own (neighbouring classes overlap), on a noisy random background; images have varied
    sizes and aspect ratios, with the short side between 0.8 and 1 times
    ``size``. The output depends only on the arguments.

    Args:
        path: Folder to write into. It is created if needed; existing files
            with the same names are overwritten.
        n_train: Training images per class.
        n_valid: Validation images per class.
        size: Nominal short side of the images in pixels (>= 16).
        seed: Seed of the random generator, an int >= 0.
        full_size: Give the images the dimensions of Imagenette's full-size release (ImageNet's
            originals) instead: mostly 500 px on the long side at 4:3 or 3:2, one in ten larger,
            up to 4000 px; ``size`` is then not used. For measuring data loading offline, where
            decoding large JPEGs is the cost.

    Returns:
        ``Path(path)``.
    """
    check_positive_int("n_train", n_train)
    check_positive_int("n_valid", n_valid)
    check_positive_int("size", size)
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size!r}")
    check_non_negative_int("seed", seed)  # numpy seeds are >= 0
    root = Path(path)
    for split_idx, (split, count) in enumerate((("train", n_train), ("val", n_valid))):
        for label, wnid in enumerate(IMAGENETTE_WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            # One generator per (split, class) keeps each folder reproducible on its own.
            rng = np.random.default_rng([seed, split_idx, label])
            for i in range(count):
                dims = _full_size_dims(rng) if full_size else _nominal_dims(rng, size)
                img = _draw_image(rng, label, dims)
                img.save(folder / f"{wnid}_{i:05d}.JPEG", format="JPEG", quality=90)
    return root


def make_digits(path: str | Path, size: int = 32, valid_pct: float = 0.25, seed: int = 0) -> Path:
    """Write scikit-learn's real handwritten digits as an ImageNet-style folder, offline.

    The 1,797 scans of ``sklearn.datasets.load_digits`` (8x8 pixels, 17 grey levels, ten classes)
    ship inside scikit-learn, so this is real data that needs no download. Each scan is scaled to
    ``size`` pixels (bilinear) and saved as a grayscale PNG under ``train/<digit>/`` or
    ``val/<digit>/``; ``valid_pct`` of each class is held out (a stratified split, shuffled with
    ``seed``). Digits must not be mirrored: train them without flips (``--no-flip`` in the recipe).

    Args:
        path: Folder to write into; created if needed.
        size: Side of the written images in pixels (>= 8).
        valid_pct: Fraction of each class held out for validation, in (0, 1).
        seed: Seed of the split, an int >= 0.

    Returns:
        ``Path(path)``.

    Raises:
        DataUnavailableError: scikit-learn is not installed.
    """
    from ._checks import check_fraction

    check_positive_int("size", size)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels (the scans are 8x8), got {size!r}")
    check_fraction("valid_pct", valid_pct, low_inclusive=False, high_inclusive=False)
    check_non_negative_int("seed", seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn comes with fastai
        raise DataUnavailableError("make_digits needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    root = Path(path)
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_valid = max(1, round(len(idx) * valid_pct))
        for split, part in (("val", idx[:n_valid]), ("train", idx[n_valid:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = Image.fromarray(images[i]).resize((size, size), Image.BILINEAR)
                img.save(folder / f"{i:04d}.png")
    return root


#: Class names of :func:`make_fake_segmentation`, in mask-value order (``codes.txt``).
SEGMENTATION_CODES: tuple[str, ...] = ("background", "disc", "square", "triangle")

# Shape painters of the segmentation data: disc, square, triangle (mask values 1, 2, 3).
_SEG_PAINTERS: tuple[_Painter, ...] = (_paint_disc, _paint_square, _paint_triangle)


def make_fake_segmentation(
    path: str | Path,
    n_train: int = 32,
    n_valid: int = 8,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small, offline segmentation data set laid out like fastai's CamVid.

    Every image is a noisy, dim gradient background with two to four shapes (discs, squares and
    triangles) at random positions, sizes and rotations, possibly overlapping and cut by the image
    border. Each shape's colour leans towards a hue of its own class, with overlapping windows, so
    colour is a hint and shape decides. The mask marks every pixel with its class: 0 background,
    1 disc, 2 square, 3 triangle (a later shape covers an earlier one in both). The layout is
    CamVid's::

        codes.txt            one class name per line, in mask-value order
        valid.txt            the file names of the validation images, one per line
        images/seg_00000.png ...
        labels/seg_00000_P.png ...   8-bit masks, pixel value = class index

    so ``SegmentationDataLoaders.from_label_func`` (with ``label_func=lambda f: path / 'labels' /
    f'{f.stem}_P{f.suffix}'``) or a ``DataBlock`` with ``FileSplitter(path / 'valid.txt')`` loads
    it. Images are square PNGs of ``size`` pixels; the output depends only on the arguments.

    Args:
        path: Folder to write into. It is created if needed; existing files with the same names
            are overwritten.
        n_train: Number of training images.
        n_valid: Number of validation images (the last ``n_valid`` files, listed in ``valid.txt``).
        size: Side of the square images in pixels (>= 16).
        seed: Seed of the random generator, an int >= 0.

    Returns:
        ``Path(path)``.

    Example:
        >>> import tempfile
        >>> root = make_fake_segmentation(tempfile.mkdtemp(), n_train=2, n_valid=1, size=32)
        >>> (root / "codes.txt").read_text().split()
        ['background', 'disc', 'square', 'triangle']
        >>> sorted(p.name for p in (root / "labels").iterdir())
        ['seg_00000_P.png', 'seg_00001_P.png', 'seg_00002_P.png']

    """
    check_positive_int("n_train", n_train)
    check_positive_int("n_valid", n_valid)
    check_positive_int("size", size)
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size!r}")
    check_non_negative_int("seed", seed)
    root = Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "codes.txt").write_text("\n".join(SEGMENTATION_CODES) + "\n")
    names = []
    for i in range(n_train + n_valid):
        # One generator per image keeps each file reproducible on its own.
        img, mask = _draw_segmentation(np.random.default_rng([seed, i]), size)
        name = f"seg_{i:05d}.png"
        img.save(root / "images" / name)
        mask.save(root / "labels" / f"seg_{i:05d}_P.png")
        names.append(name)
    (root / "valid.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


def _draw_segmentation(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """Draw one image of random shapes and its class mask."""
    c0, c1 = _random_colour(rng) * 0.45, _random_colour(rng) * 0.45
    t = np.linspace(0.0, 1.0, size)[:, None]
    grad = c0[None, :] * (1 - t) + c1[None, :] * t
    bg = grad[None, :, :] if rng.random() < 0.5 else grad[:, None, :]
    img = Image.fromarray(np.clip(np.broadcast_to(bg, (size, size, 3)), 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    n_classes = len(_SEG_PAINTERS)
    for _ in range(int(rng.integers(2, 5))):
        label = int(rng.integers(0, n_classes))
        r = size * rng.uniform(0.12, 0.25)
        centre = (rng.uniform(0, size), rng.uniform(0, size))
        hue = (label / n_classes + rng.uniform(-0.2, 0.2)) % 1.0
        colour = tuple(
            int(v) for v in np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))) * 255
        )
        # The same random draws shape the image and the mask: replay the generator state.
        state = rng.bit_generator.state
        _SEG_PAINTERS[label](draw, rng, centre, r, colour)
        rng.bit_generator.state = state
        _SEG_PAINTERS[label](draw_mask, rng, centre, r, label + 1)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, rng.uniform(3.0, 10.0), size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), mask


def _check_split_folder(root: Path) -> Path:
    """Check ``root`` holds a train split and a validation split of class folders."""
    if not root.is_dir():
        raise DataUnavailableError(f"data folder {str(root)!r} does not exist or is not a folder")
    train = root / "train"
    valid = next((root / v for v in ("val", "valid") if (root / v).is_dir()), None)
    for name, split in (("train", train), ("val (or valid)", valid)):
        if split is None or not split.is_dir():
            raise DataUnavailableError(
                f"data folder {str(root)!r} has no {name!r} subfolder; expected train/<class>/*.jpg and val/<class>/*.jpg"
            )
    for split in (train, valid):
        classes = [d for d in split.iterdir() if d.is_dir()]
        if not classes:
            raise DataUnavailableError(f"{str(split)!r} has no class subfolders")
        if not any(f.suffix.lower() in _IMAGE_EXTENSIONS for d in classes for f in d.iterdir()):
            raise DataUnavailableError(f"{str(split)!r} has class folders but no image files")
    return root


_SIZES = {160: "IMAGENETTE_160", 320: "IMAGENETTE_320", None: "IMAGENETTE", "full": "IMAGENETTE"}


def imagenette_path(data: str | Path | None = None, size: int | str | None = 160) -> Path:
    """Return the folder of an Imagenette-style data set, downloading Imagenette if needed.

    Args:
        data: A local folder with ``train/`` and ``val/`` (or ``valid/``) class
            subfolders. When given, it is checked and returned; nothing is downloaded.
        size: Which Imagenette to download when ``data`` is None: 160, 320, or
            ``'full'`` (None means full size too).

    Returns:
        The data set's root folder.

    Raises:
        DataUnavailableError: the folder is malformed, or Imagenette cannot be downloaded.
    """
    if data is not None:
        return _check_split_folder(Path(data).expanduser())
    check_choice("size", size, list(_SIZES))
    from fastai.data.external import URLs, untar_data

    url = getattr(URLs, _SIZES[size])
    try:
        return Path(untar_data(url))
    except Exception as err:  # noqa: BLE001 - any download failure gets the same advice.
        raise DataUnavailableError(
            f"could not download Imagenette from {url} ({type(err).__name__}: {err}). "
            "Pass a local folder laid out as train/<class>/ and val/<class>/ "
            "(fastai-tricks train --data PATH), or use the offline demo data "
            "(fastai-tricks train --demo, or fastai_tricks.make_fake_imagenette)."
        ) from None
