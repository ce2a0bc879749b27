"""Datasets, augmentation and REM targets.

Every dataset yields a dict:

    image       float32 (3, H, W), ImageNet-normalised
    mask        int64 (H, W): 0 background, 1 text, 255 ignore
    rem_target  float32 (1, H, W) in [0, 1]: the REM's text attention target
    id          str

On-disk layouts (SPEC §4):

* TextSeg: ``image/<id>.jpg``, ``semantic_label/<id>_maskfg.png`` (100 = text, 200 = text effect →
  background, 255 = ignore, 0 = background), ``split.json`` = {"train": [ids], "val": [...],
  "test": [...]}. Without split.json every image is in every split.
* Total-Text: ``Images/{Train,Test}/<id>.{jpg,png}``, ``groundtruth_pixel/{Train,Test}/<id>.{jpg,png}``
  (text where the grey value > 127; JPEG-compressed masks are thresholded, not compared for equality).
* ICDAR-2013 FST (the layout of the official Challenge 2 download, as TexRNet reads it):
  ``Focused_Scene_Text/{train,test}/images/<id>.jpg``, ``.../GT_Text_Segmentation/<id>_GT.bmp``
  (or ``gt_<id>.png``), an RGB image where pure white (255, 255, 255) is background and every other
  colour is a character; optional ``.../GT_Char_Localization/<id>_GT.txt`` lines
  ``R G B cx cy x0 y0 x1 y1 "c"`` give character boxes (a leading '#' marks a don't-care character,
  whose pixels become ignore = 255).
* Synthetic: generated on the fly by armnet.synth from (seed, index); `python -m armnet synth`
  writes it to disk in the TextSeg layout (PNG images, ``chars/<id>.json`` character boxes).

REM targets are pluggable: a dataset takes `rem_target=callable(mask, char_boxes) -> (H, W) float
array in [0, 1]`. The default, `gaussian_text_map`, draws one anisotropic Gaussian per character box
(σ = box size / 4, peak 1, max over boxes). Without character boxes it uses the text mask blurred by
a Gaussian (a stand-in for word-level maps); `polygon_gaussian_map` makes the map from word polygons.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from torch.utils.data import Dataset

from .imaging import IMAGENET_MEAN, IMAGENET_STD, load_image  # noqa: F401 - re-exported
from .synth import render_sample

IGNORE = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


# ---- REM targets ------------------------------------------------------------------------------

def gaussian_text_map(mask: np.ndarray, char_boxes: np.ndarray | None = None) -> np.ndarray:
    """One Gaussian per character box (x0, y0, x1, y1), σ = side/4; max over boxes.

    With no boxes: the text mask (ignore counts as 0) blurred by a Gaussian of σ = 2 px and scaled
    to peak 1.
    """
    h, w = mask.shape
    out = np.zeros((h, w), np.float32)
    if char_boxes is not None and len(char_boxes):
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        for x0, y0, x1, y1 in np.asarray(char_boxes, np.float32):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            sx, sy = max((x1 - x0) / 4, 0.5), max((y1 - y0) / 4, 0.5)
            # evaluate only inside a 3σ window: boxes are small, images need not be
            ya, yb = int(max(cy - 3 * sy, 0)), int(min(cy + 3 * sy + 1, h))
            xa, xb = int(max(cx - 3 * sx, 0)), int(min(cx + 3 * sx + 1, w))
            if ya >= yb or xa >= xb:
                continue
            g = np.exp(-((xx[:, xa:xb] - cx) ** 2) / (2 * sx * sx)
                       - ((yy[ya:yb] - cy) ** 2) / (2 * sy * sy))
            np.maximum(out[ya:yb, xa:xb], g, out=out[ya:yb, xa:xb])
        return out
    text = Image.fromarray(np.uint8((mask == 1) * 255))
    blurred = np.asarray(text.filter(ImageFilter.GaussianBlur(2)), np.float32)
    peak = blurred.max()
    return blurred / peak if peak > 0 else out


def polygon_gaussian_map(shape, polygons) -> np.ndarray:
    """Word-level target: each polygon filled, then blurred with σ = ¼ of its short side."""
    h, w = shape
    out = np.zeros((h, w), np.float32)
    for poly in polygons:
        pts = [tuple(map(float, p)) for p in poly]
        im = Image.new("L", (w, h), 0)
        ImageDraw.Draw(im).polygon(pts, fill=255)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sigma = max(min(max(xs) - min(xs), max(ys) - min(ys)) / 4, 1.0)
        g = np.asarray(im.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
        if g.max() > 0:
            np.maximum(out, g / g.max(), out=out)
    return out


# ---- image I/O ----------------------------------------------------------------------------------

def load_label(path: str) -> np.ndarray:
    """A label image as a 2-D array of its stored values.

    Greyscale and palette PNGs keep their raw values (a palette index is the class value in
    label files; converting through the palette would turn it into a luminance); RGB labels are
    converted to grey.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":  # bilevel: white = 255
                return np.asarray(im).astype(np.int64) * 255
            if im.mode in ("L", "P", "I", "I;16"):
                return np.asarray(im).astype(np.int64)
            return np.asarray(im.convert("L")).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(f"cannot read label {path!r} (corrupt or not an image): {e}") from e


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory not found: {path!r}")


def _find_with_ext(folder: str, stem: str) -> str | None:
    for ext in IMAGE_EXTS:
        p = os.path.join(folder, stem + ext)
        if os.path.exists(p):
            return p
    return None


# ---- transforms -----------------------------------------------------------------------------------

def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8-range float (3, H, W) → ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image / 255.0 - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return ((image * std + mean) * 255).clamp(0, 255)


def resize_label(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resizes an (H, W) label map of {0, 1, IGNORE} on the bilinear (pixel-centre) grid: a pixel is
    text where the resampled text indicator is > 0.5 and ignored where the resampled ignore
    indicator is >= 0.5."""
    ind = torch.stack([(mask == 1), (mask == IGNORE)]).float()[None]
    text, ignore = F.interpolate(ind, size, mode="bilinear", align_corners=False)[0]
    out = (text > 0.5).long()
    out[ignore >= 0.5] = IGNORE
    return out


class TrainAugment:
    """Random scale, random crop padded with ignore, h-flip.

    The scale resamples the image, the REM target and the mask on the same pixel-centre grid
    (bilinear, align_corners=False); the mask's text and ignore indicators are resampled that way
    and thresholded at 0.5. PyTorch's legacy "nearest" mode samples at floor(i / s) instead of the
    pixel centres, which shifts the labels by up to half a source pixel against the image: on the
    synthetic set, where strokes are 2-5 px wide, such labels score only F = 0.81-0.88 against the
    centre-aligned ones (at scales 0.8 and 1.2): label noise exactly where the errors are.

    `crop_size` (h, w) or None; padding uses 0 for the image (before normalisation: black) and 255
    (ignore) for the mask, so padded pixels never count in the loss.
    """

    def __init__(self, crop_size=(512, 512), scale=(0.5, 2.0), flip: float = 0.5):
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {tuple(scale)}")
        self.crop_size, self.scale, self.flip = crop_size, scale, flip

    def __call__(self, image, mask, rem, rng: np.random.Generator):
        s = float(rng.uniform(*self.scale))
        h, w = mask.shape
        nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], (nh, nw), mode="bilinear", align_corners=False)[0]
            rem = F.interpolate(rem[None], (nh, nw), mode="bilinear", align_corners=False)[0]
            mask = resize_label(mask, (nh, nw))
        if self.crop_size is not None:
            ch, cw = self.crop_size
            ph, pw = max(ch - nh, 0), max(cw - nw, 0)
            if ph or pw:
                image = F.pad(image, (0, pw, 0, ph))
                rem = F.pad(rem, (0, pw, 0, ph))
                mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE)
            H, W = mask.shape
            y0, x0 = int(rng.integers(H - ch + 1)), int(rng.integers(W - cw + 1))
            image, rem = image[:, y0:y0 + ch, x0:x0 + cw], rem[:, y0:y0 + ch, x0:x0 + cw]
            mask = mask[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < self.flip:
            image, rem, mask = image.flip(-1), rem.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous(), rem.contiguous()


class SegmentationDataset(Dataset):
    """Base: subclasses fill `self.items` and implement `read(i) -> (PIL RGB, mask uint8, boxes)`."""

    def __init__(self, augment: TrainAugment | None = None,
                 rem_target: Callable | None = gaussian_text_map, aug_seed: int = 0):
        self.augment, self.rem_target, self.aug_seed = augment, rem_target, aug_seed
        self.items: list = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Makes the augmentation differ per epoch but stay reproducible."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int):
        raise NotImplementedError

    def item_id(self, i: int) -> str:
        return str(self.items[i])

    def __getitem__(self, i: int):
        img, mask, boxes = self.read(i)
        arr = np.asarray(img, np.uint8)
        if arr.shape[:2] != mask.shape:
            raise RuntimeError(f"{self.item_id(i)}: image size {arr.shape[:2]} != label size "
                               f"{mask.shape}")
        rem = (self.rem_target(mask, boxes) if self.rem_target is not None
               else np.zeros(mask.shape, np.float32))
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
        mask_t = torch.from_numpy(mask.astype(np.int64))
        rem_t = torch.from_numpy(np.asarray(rem, np.float32))[None]
        if self.augment is not None:
            rng = np.random.default_rng((self.aug_seed, self.epoch, i))
            image, mask_t, rem_t = self.augment(image, mask_t, rem_t, rng)
        return {"image": normalize(image), "mask": mask_t, "rem_target": rem_t,
                "id": self.item_id(i)}


class TextSegDataset(SegmentationDataset):
    """TextSeg: see the module docstring. `split` is a key of split.json ("train", "val", "test")."""

    def __init__(self, root: str, split: str = "train", **kw):
        super().__init__(**kw)
        _require_dir(root, "TextSeg root")
        self.image_dir = os.path.join(root, "image")
        self.label_dir = os.path.join(root, "semantic_label")
        _require_dir(self.image_dir, "TextSeg images")
        _require_dir(self.label_dir, "TextSeg labels")
        split_file = os.path.join(root, "split.json")
        if os.path.exists(split_file):
            with open(split_file) as f:
                splits = json.load(f)
            if split not in splits:
                raise ValueError(f"TextSeg split must be one of {sorted(splits)}, got {split!r}")
            ids = [str(s) for s in splits[split]]
        else:
            ids = sorted(os.path.splitext(f)[0] for f in os.listdir(self.image_dir)
                         if f.lower().endswith(IMAGE_EXTS))
        self.chars_dir = os.path.join(root, "chars")
        self.items = ids

    def read(self, i):
        sid = self.items[i]
        ipath = _find_with_ext(self.image_dir, sid)
        lpath = os.path.join(self.label_dir, f"{sid}_maskfg.png")
        if ipath is None:
            raise FileNotFoundError(f"TextSeg: no image for id {sid!r} in {self.image_dir}")
        if not os.path.exists(lpath):
            raise FileNotFoundError(f"TextSeg: label file not found: {lpath}")
        raw = load_label(lpath)
        mask = np.zeros(raw.shape, np.uint8)
        mask[raw == 100] = 1
        mask[raw == IGNORE] = IGNORE
        boxes = None
        cpath = os.path.join(self.chars_dir, f"{sid}.json")
        if os.path.exists(cpath):
            with open(cpath) as f:
                boxes = np.asarray(json.load(f), np.float32).reshape(-1, 4)
        return load_image(ipath), mask, boxes


class TotalTextDataset(SegmentationDataset):
    """Total-Text: see the module docstring. `split` is "train" or "test" (any case)."""

    def __init__(self, root: str, split: str = "train", **kw):
        super().__init__(**kw)
        sub = {"train": "Train", "test": "Test"}.get(split.lower())
        if sub is None:
            raise ValueError(f"Total-Text split must be 'train' or 'test', got {split!r}")
        _require_dir(root, "Total-Text root")
        self.image_dir = os.path.join(root, "Images", sub)
        self.label_dir = os.path.join(root, "groundtruth_pixel", sub)
        _require_dir(self.image_dir, "Total-Text images")
        _require_dir(self.label_dir, "Total-Text labels")
        self.items = sorted(os.path.splitext(f)[0] for f in os.listdir(self.image_dir)
                            if f.lower().endswith(IMAGE_EXTS))

    def read(self, i):
        sid = self.items[i]
        lpath = _find_with_ext(self.label_dir, sid)
        if lpath is None:
            raise FileNotFoundError(f"Total-Text: no label for {sid!r} in {self.label_dir}")
        raw = load_label(lpath)
        mask = (raw > 127).astype(np.uint8)
        return load_image(_find_with_ext(self.image_dir, sid)), mask, None


class ICDAR13Dataset(SegmentationDataset):
    """ICDAR-2013 Focused Scene Text: see the module docstring. `split` is "train" or "test"."""

    def __init__(self, root: str, split: str = "train", **kw):
        super().__init__(**kw)
        if split.lower() not in ("train", "test"):
            raise ValueError(f"ICDAR-2013 split must be 'train' or 'test', got {split!r}")
        _require_dir(root, "ICDAR-2013 root")
        base = os.path.join(root, "Focused_Scene_Text", split.lower())
        _require_dir(base, "ICDAR-2013 Focused_Scene_Text split")
        self.image_dir = os.path.join(base, "images")
        self.label_dir = os.path.join(base, "GT_Text_Segmentation")
        self.char_dir = os.path.join(base, "GT_Char_Localization")
        _require_dir(self.image_dir, "ICDAR-2013 images")
        _require_dir(self.label_dir, "ICDAR-2013 labels")
        self.items = sorted(os.path.splitext(f)[0] for f in os.listdir(self.image_dir)
                            if f.lower().endswith(IMAGE_EXTS))

    def read(self, i):
        sid = self.items[i]
        lpath = None
        for name in (f"{sid}_GT.bmp", f"gt_{sid}.png", f"{sid}_GT.png"):
            if os.path.exists(os.path.join(self.label_dir, name)):
                lpath = os.path.join(self.label_dir, name)
                break
        if lpath is None:
            raise FileNotFoundError(f"ICDAR-2013: no label for {sid!r} in {self.label_dir}")
        rgb = np.asarray(load_image(lpath, "RGB")).astype(np.int32)
        mask = (rgb != 255).any(-1).astype(np.uint8)
        boxes = []
        cpath = os.path.join(self.char_dir, f"{sid}_GT.txt")
        if os.path.exists(cpath):
            code = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
            with open(cpath, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    dont_care = line.startswith("#")
                    parts = line.lstrip("#").split()
                    if len(parts) < 9:
                        continue
                    try:
                        r, g, b, _, _, x0, y0, x1, y1 = (int(p) for p in parts[:9])
                    except ValueError:
                        continue
                    if dont_care:
                        mask[code == r * 65536 + g * 256 + b] = IGNORE
                    else:
                        boxes.append((x0, y0, x1, y1))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else None
        return load_image(_find_with_ext(self.image_dir, sid)), mask, boxes


class SyntheticTextDataset(SegmentationDataset):
    """`length` synthetic images of `size` (h, w); sample i is a pure function of (seed, i).

    `cache=True` keeps the rendered samples in memory (rendering costs ~15 ms per 128² image).
    """

    def __init__(self, length: int, seed: int = 0, size=(128, 128), cache: bool = False, **kw):
        super().__init__(**kw)
        self.seed = seed
        self.size = tuple(size)
        self.items = list(range(length))
        self._cache = {} if cache else None

    def item_id(self, i):
        return f"synth_{self.seed}_{i:06d}"

    def read(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        arr, mask, boxes = render_sample(np.random.default_rng((self.seed, i)), self.size)
        out = (Image.fromarray(arr), mask, boxes)
        if self._cache is not None:
            self._cache[i] = out
        return out


def write_synthetic(out_dir: str, length: int, seed: int, size=(128, 128),
                    split: str = "test") -> None:
    """Writes a synthetic set in the TextSeg layout (PNG images; chars/<id>.json boxes)."""
    ds = SyntheticTextDataset(length, seed, size, rem_target=None)
    for sub in ("image", "semantic_label", "chars"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    ids = []
    for i in range(length):
        img, mask, boxes = ds.read(i)
        sid = ds.item_id(i)
        ids.append(sid)
        img.save(os.path.join(out_dir, "image", f"{sid}.png"))
        Image.fromarray(np.uint8(mask) * 100).save(
            os.path.join(out_dir, "semantic_label", f"{sid}_maskfg.png"))
        with open(os.path.join(out_dir, "chars", f"{sid}.json"), "w") as f:
            json.dump(np.asarray(boxes).tolist(), f)
    with open(os.path.join(out_dir, "split.json"), "w") as f:
        json.dump({split: ids}, f)


DATASETS = {"textseg": TextSegDataset, "totaltext": TotalTextDataset, "icdar13": ICDAR13Dataset}


def build_dataset(name: str, root: str | None = None, split: str = "train", *,
                  augment: TrainAugment | None = None, synth_n: int = 1000, synth_seed: int = 0,
                  synth_size=(128, 128), cache: bool = False, **kw) -> SegmentationDataset:
    if name == "synthetic":
        return SyntheticTextDataset(synth_n, synth_seed, synth_size, cache=cache, augment=augment,
                                    **kw)
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS) + ['synthetic']}, got {name!r}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root")
    return DATASETS[name](root, split, augment=augment, **kw)


def collate(batch):
    """Stacks same-size samples; evaluation uses batch size 1 for images of different sizes."""
    return {"image": torch.stack([b["image"] for b in batch]),
            "mask": torch.stack([b["mask"] for b in batch]),
            "rem_target": torch.stack([b["rem_target"] for b in batch]),
            "id": [b["id"] for b in batch]}
