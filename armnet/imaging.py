"""The torch-free half of `predict`: reading images, the input normalisation, bilinear resizing as
PyTorch does it, and writing the mask and the overlay. numpy and Pillow only, so that the ONNX
Runtime path (armnet/onnx_infer.py) runs without torch and gives what `predict` gives.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _opened(path: str, what: str):
    """Image.open with errors that name the file: FileNotFoundError, or RuntimeError when it is
    corrupt or not an image (decoding inside the `with` is covered too)."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(f"cannot read {what} {path!r} (corrupt or not an image): {e}") from e


def image_size(path: str, what: str = "image") -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    with _opened(path, what) as im:
        return im.height, im.width


def load_image(path: str, mode: str = "RGB", what: str = "image") -> Image.Image:
    """Opens an image fully (decoding now, so a truncated file fails here with its name)."""
    with _opened(path, what) as im:
        im.load()
        return im.convert(mode)


def limited_size(h: int, w: int, max_side: int) -> tuple[int, int] | None:
    """`--max-side`: the (height, width) that brings the longer side down to max_side, or None
    when (h, w) is within it or max_side is 0."""
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0: no limit), got {max_side}")
    if not max_side or max(h, w) <= max_side:
        return None
    s = max_side / max(h, w)
    return max(round(h * s), 1), max(round(w * s), 1)


def limit_side(x: np.ndarray, max_side: int) -> np.ndarray:
    """`predict --max-side` in numpy: x (..., C, H, W) float32 downscaled to limited_size,
    bilinear with antialiasing (Pillow's float resize, which PyTorch's antialiased bilinear
    interpolation, used by predict, was built to match)."""
    h, w = x.shape[-2:]
    size = limited_size(h, w, max_side)
    if size is None:
        return x
    flat = x.reshape(-1, h, w)
    out = [np.asarray(Image.fromarray(c, mode="F").resize(size[::-1], Image.BILINEAR)) for c in flat]
    return np.stack(out).reshape(*x.shape[:-2], *size).astype(np.float32)


def normalize_array(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 (3, H, W), ImageNet-normalised (the model's input)."""
    x = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (x - mean) / std


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of F.interpolate(mode="bilinear", align_corners=False) along
    one axis: src = (o + 0.5)·n_in/n_out - 0.5, clamped at 0."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) -> (..., *size), as F.interpolate(x, size, mode="bilinear",
    align_corners=False) computes it."""
    H, W = x.shape[-2:]
    if (H, W) == tuple(size):
        return x
    r0, r1, wr = _linear_taps(H, size[0])
    c0, c1, wc = _linear_taps(W, size[1])
    rows = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    return (rows[..., c0] * (1 - wc) + rows[..., c1] * wc).astype(x.dtype)


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image with text pixels tinted red and their outline drawn in yellow."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    m = mask.astype(bool)
    out = rgb.copy()
    out[m] = (1 - alpha) * rgb[m] + alpha * np.array([255, 0, 0], np.float32)
    pil_mask = Image.fromarray(np.uint8(m) * 255)
    edge = (np.asarray(pil_mask.filter(ImageFilter.MaxFilter(3))) > 0) & ~m
    out[edge] = (255, 230, 0)
    return Image.fromarray(np.uint8(out))


def write_prediction(path: str, img: Image.Image, mask: np.ndarray, out_dir: str,
                     quiet: bool = False) -> list[str]:
    """Writes <out_dir>/<stem>_mask.png (0 / 255) and <stem>_overlay.png; prints (unless quiet)
    and returns their paths."""
    stem = os.path.splitext(os.path.basename(path))[0]
    mpath = os.path.join(out_dir, f"{stem}_mask.png")
    opath = os.path.join(out_dir, f"{stem}_overlay.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
    overlay(img, mask).save(opath)
    if not quiet:
        print(f"{path}: {100 * mask.mean():.1f}% text -> {mpath}, {opath}")
    return [mpath, opath]
