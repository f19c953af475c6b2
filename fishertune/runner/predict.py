"""``fishertune predict``: a kept model's predictions on any image, as the cell evaluated.

Each image is predicted by :func:`fishertune.engine.evaluate.predict`, the one place a prediction is
made: resized keeping its ratio to a target's test size, a sliding window with the cell's crop and
stride (windows batched as in evaluation, the cell's precision), logits resized to the image's own
size and arg-maxed. The CPU thread count the cell evaluated with is used again (it changes CPU sums in
their last bits), so that on the machine kind that ran the cell the train ids are those the cell saved.

For ``photo.jpg`` three PNGs are written (a directory's images keep their relative paths):
``photo_trainid.png`` (8-bit train ids 0..18), ``photo_color.png`` (the Cityscapes palette) and
``photo_overlay.png`` (the colours blended over the image with ``alpha``), each atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fishertune.data.files import read_image
from fishertune.data.labels import colourize
from fishertune.engine.evaluate import predict
from fishertune.errors import UserError
from fishertune.precision import compute_dtype
from fishertune.progress import bar
from fishertune.runner.environment import cpu_threads, resolve_device
from fishertune.runner.model import load_model
from fishertune.runner.store import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OUTPUTS = ("trainid", "color", "overlay")


def collect_images(inputs: list[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """``(image, output stem)`` for every input: a file as itself (stem: its name without suffix), a
    directory as every image below it (stem: its path relative to the directory). Two inputs that
    would write the same files, a missing path and a directory without images are user errors."""
    found: list[tuple[Path, Path]] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.name.startswith("."))
            if not images:
                raise UserError(f"{path}: no images in this directory (looked for {', '.join(IMAGE_SUFFIXES)})")
            found += [(p, p.relative_to(path).with_suffix("")) for p in images]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise UserError(f"{path}: no such image or directory")
    seen: dict[Path, Path] = {}
    for image, stem in found:
        if stem in seen:
            raise UserError(f"{seen[stem]} and {image} would both be written as {stem}_*.png; predict them into "
                            "different --out directories")
        seen[stem] = image
    return found


def _open(path: Path) -> np.ndarray:
    try:
        return read_image(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e}); give PNG, JPEG or another format Pillow reads") from None


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) image + alpha colours``, rounded, uint8."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, "PNG"))


def predict_images(model: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike, *,
                   weights: str | os.PathLike | None = None, target: str | None = None,
                   test_size: tuple[int, int] | None = None, device: str = "auto", alpha: float = 0.5) -> list[Path]:
    """Predict every image of ``inputs`` with the kept or exported ``model`` (see the module docstring);
    returns the files written. ``target`` picks whose test size the images are resized to (default:
    the cell's first target), ``test_size`` (long, short) overrides it; ``weights`` is the pretrained
    file (default: where the card says it was, else ``$FISHERTUNE_WEIGHTS``)."""
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: the overlay's colour weight must be in [0, 1]")
    images = collect_images(inputs)  # bad paths fail before the model is built
    dev = resolve_device(device)
    segmentor, card = load_model(Path(model), dev, weights)
    inference = card["inference"]
    if test_size is None:
        sizes = inference["test_sizes"]
        target = target or next(iter(sizes))
        if target not in sizes:
            raise UserError(f"--target {target}: the model was evaluated on {', '.join(sizes)}; pick one of them or "
                            "give --test-size LONG SHORT")
        test_size = tuple(sizes[target])
    elif min(test_size) < 1:
        raise UserError(f"--test-size {test_size[0]} {test_size[1]}: both bounds must be positive")
    out = Path(out)
    written: list[Path] = []
    with cpu_threads(inference["threads"]), compute_dtype(inference["precision"]):
        for path, stem in bar(images, desc="predict", unit="img"):
            image = _open(path)
            ids = predict(segmentor, image, image.shape[:2], test_size, inference["crop_size"], inference["stride"],
                          inference["eval_batch"], dev, precision=inference["precision"])
            colours = colourize(ids)
            for kind, array in zip(OUTPUTS, (ids, colours, overlay(image, colours, alpha))):
                target_path = out / stem.parent / f"{stem.name}_{kind}.png"
                _save(target_path, array)
                written.append(target_path)
    return written
