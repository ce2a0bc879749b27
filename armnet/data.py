"""Datasets, augmentation and REM targets.

Every dataset yields a dict:

    image       float32 (3, H, W), ImageNet-normalised
    mask        int64 (H, W): 0 background, 1 text, 255 ignore
    rem_target  float32 (1, H, W) in [0, 1]: the REM's text attention target
    id          str

On-disk layouts (SPEC §4). File extensions are matched case-insensitively everywhere (the
Total-Text release has ``groundtruth_pixel/Train/img61.JPG``).

* TextSeg (the release: image.tar.gz, annotation.tar.gz, semantic_label.tar.gz, split.json):
  ``image/<id>.jpg``; ``semantic_label/<id>_maskfg.png`` (100 = text, 200 = text effect →
  background, 255 = ignore, 0 = background; any other value is ignore, as in TexRNet, whose
  evaluator ignores labels ≥ 2), or ``semantic_label_v1/<id>_maskfg.png``, the paper's labels
  (`labels="v1"`; "auto" takes ``semantic_label`` when present); ``split.json`` = {"train":
  [ids], "val": [...], "test": [...]} (without it every image is in every split);
  ``annotation/<id>_anno.json`` (optional; TexRNet's code reads it from ``bpoly_label/``, also
  accepted): {word_key: {"text", "bbox": polygon, "char": {char_key: {"text", "bbox": polygon,
  "mask_value"}}}} with a polygon as a flat [x1, y1, x2, y2, ...] list (nested [[x, y], ...] and the
  keys "poly", "polygon", "points" are accepted too). The REM target comes from it (below).
  A character's "mask_value" is its value in the character instance mask ``<id>_mask.png``
  (looked up in ``annotation/``, then in TexRNet's ``instance_label/``); TexRNet takes its
  character boxes from that mask, and so do we for a character that has no polygon. An
  annotation that has words but yields no geometry at all warns once, naming the keys it saw.
* Total-Text: ``Images/{Train,Test}/<id>.<ext>``, ``groundtruth_pixel/{Train,Test}/<id>.<ext>``
  (text where the grey value > 127, as TexRNet thresholds the JPEG-compressed masks).
* ICDAR-2013 Focused Scene Text, three layouts (`ICDAR13Dataset.layout` says which was found):
  - ``"rrc"``, the official Robust Reading download unzipped into folders named after its zips:
    ``Challenge2_Training_Task12_Images/<n>.jpg`` with ``Challenge2_Training_Task2_GT/<n>_GT.bmp``
    and ``<n>_GT.txt``; ``Challenge2_Test_Task12_Images/img_<n>.jpg`` with
    ``Challenge2_Test_Task2_GT/gt_img_<n>.png`` (and ``img_<n>_GT.txt`` when present).
  - ``"texrnet"``, TexRNet's arrangement of the same files (its `init_load_info_fromori`):
    ``Focused_Scene_Text/{train,test}/images/<id>.<ext>``,
    ``.../GT_Text_Segmentation/<id>_GT.bmp`` or ``gt_<id>.png``,
    ``.../GT_Char_Localization/<id>_GT.txt`` (optional).
  - ``"texrnet_addon"``, TexRNet's rearranged, preprocessed copy (its default, FROM_SOURCE =
    'addon' in configs/cfg_dataset.py): ``Focused_Scene_Text/addon/{train,test}_image/<id>.<ext>``,
    ``.../{train,test}_label/<id>_seglabel.png`` (a character instance map: 0 background, k ≥ 1
    character k, 999 = TexRNet's ignore label; 255 is read as ignore too, since an 8-bit PNG cannot
    hold 999) and ``<id>_charbbox.json`` (rows [y0, x0, y1, x1, class, instance], optional).
  The colour GT of the first two is an RGB image: white (255, 255, 255) is background; a
  ``*_GT.txt`` line ``R G B cx cy x0 y0 x1 y1 "c"`` lists one character's colour and box, and a
  leading '#' marks a don't-care character. As in TexRNet (Icdar13_CharBboxLoader_Original), when
  the txt exists the listed colours are text, the don't-care colours are ignore (255), and every
  colour the txt does not list is ignore too. Without a txt every non-white pixel is text.
* Synthetic: generated on the fly by armnet.synth from (seed, index); `python -m armnet synth`
  writes it to disk in the TextSeg layout (PNG images, ``annotation/<id>_anno.json`` with the
  character boxes as polygons).

A dataset checks its whole tree when it is built: every image and label must exist, open, and have
the same size; all problems are raised together in one DatasetError. `check_data` (the
`check-data` command) runs the same listing and then the loaders' own `read` on every sample.

REM targets are pluggable: a dataset takes `rem_target=callable(mask, regions) -> (H, W) float array
in [0, 1]`, where `regions` is None, a (K, 4) array of character boxes (x0, y0, x1, y1), or a
`TextRegions` (character boxes plus the polygons of words that have no character geometry). The
default, `gaussian_text_map`, draws one anisotropic Gaussian per character box (σ = box size / 4,
peak 1, max over boxes) and, for each word without characters, `polygon_gaussian_map`'s blurred
word polygon; with neither it uses the text mask blurred by a Gaussian.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from tqdm import tqdm

from .imaging import IMAGENET_MEAN, IMAGENET_STD, _opened, image_size, load_image  # noqa: F401 - re-exported
from .synth import render_sample

IGNORE = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


# ---- REM targets ------------------------------------------------------------------------------

class TextRegions(NamedTuple):
    """Character boxes (K, 4) as x0, y0, x1, y1 (or None), and the polygons ([(x, y), ...]) of the
    words that have no character geometry."""
    char_boxes: np.ndarray | None
    word_polygons: list


def _box_gaussians(shape, char_boxes) -> np.ndarray:
    h, w = shape
    out = np.zeros((h, w), np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    for x0, y0, x1, y1 in np.asarray(char_boxes, np.float32).reshape(-1, 4):
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


def gaussian_text_map(mask: np.ndarray, regions=None) -> np.ndarray:
    """The default REM target (see the module docstring): Gaussians of the character boxes, the
    blurred polygons of words without characters, or (with neither) the text mask (ignore counts
    as 0) blurred by a Gaussian of σ = 2 px and scaled to peak 1."""
    if isinstance(regions, TextRegions):
        boxes, words = regions.char_boxes, regions.word_polygons
    else:
        boxes, words = regions, []
    has_boxes = boxes is not None and len(boxes) > 0
    if has_boxes or words:
        out = _box_gaussians(mask.shape, boxes) if has_boxes else np.zeros(mask.shape, np.float32)
        if words:
            np.maximum(out, polygon_gaussian_map(mask.shape, words), out=out)
        return out
    text = Image.fromarray(np.uint8((mask == 1) * 255))
    blurred = np.asarray(text.filter(ImageFilter.GaussianBlur(2)), np.float32)
    peak = blurred.max()
    return blurred / peak if peak > 0 else np.zeros(mask.shape, np.float32)


def polygon_gaussian_map(shape, polygons) -> np.ndarray:
    """Word-level target: each polygon filled, blurred with σ = ¼ of its bounding box's short side
    and scaled to peak 1; max over polygons. Each blur runs in the polygon's box plus 4σ."""
    h, w = shape
    out = np.zeros((h, w), np.float32)
    for poly in polygons:
        pts = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        (xmin, ymin), (xmax, ymax) = pts.min(0), pts.max(0)
        sigma = max(float(min(xmax - xmin, ymax - ymin)) / 4, 1.0)
        pad = 4 * sigma
        xa, ya = int(max(np.floor(xmin - pad), 0)), int(max(np.floor(ymin - pad), 0))
        xb, yb = int(min(np.ceil(xmax + pad) + 1, w)), int(min(np.ceil(ymax + pad) + 1, h))
        if xa >= xb or ya >= yb:
            continue
        im = Image.new("L", (xb - xa, yb - ya), 0)
        ImageDraw.Draw(im).polygon([(x - xa, y - ya) for x, y in pts], fill=255)
        g = np.asarray(im.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
        if g.max() > 0:
            np.maximum(out[ya:yb, xa:xb], g / g.max(), out=out[ya:yb, xa:xb])
    return out


# ---- image I/O ----------------------------------------------------------------------------------

def load_label(path: str) -> np.ndarray:
    """A label image as a 2-D array of its stored values.

    Greyscale and palette PNGs keep their raw values (a palette index is the class value in
    label files; converting through the palette would turn it into a luminance); RGB labels are
    converted to grey.
    """
    with _opened(path, "label") as im:
        im.load()
        if im.mode == "1":  # bilevel: white = 255
            return np.asarray(im).astype(np.int64) * 255
        if im.mode in ("L", "P", "I", "I;16"):
            return np.asarray(im).astype(np.int64)
        return np.asarray(im.convert("L")).astype(np.int64)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory not found: {path!r}")


class _Folder:
    """A directory's files, looked up by stem with the extension matched case-insensitively."""

    def __init__(self, path: str):
        self.path = path
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        self._by_key: dict[tuple[str, str], str] = {}
        self.images: dict[str, list[str]] = {}      # stem -> image file names
        for name in names:
            stem, ext = os.path.splitext(name)
            self._by_key.setdefault((stem, ext.lower()), name)
            if ext.lower() in IMAGE_EXTS:
                self.images.setdefault(stem, []).append(name)

    def find(self, stem: str, exts=IMAGE_EXTS) -> str | None:
        for ext in exts:
            name = self._by_key.get((stem, ext))
            if name is not None:
                return os.path.join(self.path, name)
        return None

    def describe(self, stem: str, exts=IMAGE_EXTS) -> str:
        return os.path.join(self.path, stem + ".{" + ",".join(e[1:] for e in exts) + "}")


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


class DatasetError(RuntimeError):
    """Problems found in a dataset tree, every one listed in the message (and in `.problems`)."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s) in the dataset tree (run "
                         "`python -m armnet check-data` for a full check):\n  "
                         + "\n  ".join(self.problems))


class Sample(NamedTuple):
    """One image of a dataset on disk: its id and the paths of its files."""
    id: str
    image: str
    label: str
    annotation: str | None = None    # character / word geometry (json or txt), optional
    instance: str | None = None      # TextSeg's character instance mask, optional


class SegmentationDataset(Dataset):
    """Base: subclasses fill `self.items` and implement `read(i) -> (PIL RGB, mask uint8, regions)`
    (regions: see `gaussian_text_map`)."""

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
        img, mask, regions = self.read(i)
        arr = np.asarray(img, np.uint8)
        if arr.shape[:2] != mask.shape:
            raise RuntimeError(f"{self.item_id(i)}: image size {arr.shape[:2]} != label size "
                               f"{mask.shape}")
        rem = (self.rem_target(mask, regions) if self.rem_target is not None
               else np.zeros(mask.shape, np.float32))
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
        mask_t = torch.from_numpy(mask.astype(np.int64))
        rem_t = torch.from_numpy(np.asarray(rem, np.float32))[None]
        if self.augment is not None:
            rng = np.random.default_rng((self.aug_seed, self.epoch, i))
            image, mask_t, rem_t = self.augment(image, mask_t, rem_t, rng)
        return {"image": normalize(image), "mask": mask_t, "rem_target": rem_t,
                "id": self.item_id(i)}


class FileDataset(SegmentationDataset):
    """Base of the datasets on disk. A subclass lists its `Sample`s in `self.items`, records what
    it could not find in `self.listing_problems`, implements `read(i)` and ends its constructor
    with `self._finish(validate)`, which raises one DatasetError listing every problem: missing
    files, files that do not open, image and label of different sizes (read from the headers)."""

    what = "dataset"

    def __init__(self, root: str, split: str, **kw):
        super().__init__(**kw)
        self.root, self.split = root, split
        self.listing_problems: list[str] = []

    @classmethod
    def splits(cls, root: str) -> list[str]:
        return ["train", "test"]

    def item_id(self, i: int) -> str:
        return self.items[i].id

    def _sample_problems(self, i: int, deep: bool) -> list[str]:
        s = self.items[i]
        try:
            if deep:     # exactly what training and eval will do with this sample
                img, mask, _ = self.read(i)
                sizes = (img.height, img.width), tuple(mask.shape)
            else:
                sizes = image_size(s.image), image_size(s.label, "label")
        except (FileNotFoundError, RuntimeError, ValueError, OSError) as e:
            return [f"{s.id}: {e}"]
        if sizes[0] != sizes[1]:
            return [f"{s.id}: image size {sizes[0]} != label size {sizes[1]} "
                    f"({s.image}, {s.label})"]
        return []

    def problems(self, deep: bool = False, progress: bool = False) -> list[str]:
        """Every problem of this split: the listing's, then each sample's (headers only, or with
        `deep` a full `read` of every sample)."""
        out = list(self.listing_problems)
        for i in tqdm(range(len(self.items)), desc=f"{self.split}", disable=not progress,
                      leave=False, dynamic_ncols=True):
            out += self._sample_problems(i, deep)
        return out

    def _finish(self, validate: bool) -> None:
        if validate:
            problems = self.problems(deep=False)
            if problems:
                raise DatasetError(f"{self.what} {self.split!r} split in {self.root!r}", problems)


class TextSegDataset(FileDataset):
    """TextSeg: see the module docstring. `split` is a key of split.json ("train", "val", "test");
    `labels` "auto" (semantic_label, else semantic_label_v1), "v2" or "v1"."""

    what = "TextSeg"
    LABEL_DIRS = {"v2": "semantic_label", "v1": "semantic_label_v1"}

    def __init__(self, root: str, split: str = "train", labels: str = "auto",
                 validate: bool = True, **kw):
        super().__init__(root, split, **kw)
        if labels not in ("auto", "v2", "v1"):
            raise ValueError(f"TextSeg labels must be 'auto', 'v2' or 'v1', got {labels!r}")
        _require_dir(root, "TextSeg root")
        image_dir = os.path.join(root, "image")
        _require_dir(image_dir, "TextSeg images")
        if labels == "auto":
            labels = "v2" if os.path.isdir(os.path.join(root, self.LABEL_DIRS["v2"])) else "v1"
        label_dir = os.path.join(root, self.LABEL_DIRS[labels])
        if not os.path.isdir(label_dir):
            raise FileNotFoundError(f"TextSeg labels: directory not found: {label_dir!r}"
                                    + (" (nor semantic_label)" if labels == "v1" else ""))
        self.labels = labels
        images, label_folder = _Folder(image_dir), _Folder(label_dir)
        annos = [_Folder(os.path.join(root, d)) for d in ("annotation", "bpoly_label")]
        instances = [_Folder(os.path.join(root, d)) for d in ("annotation", "instance_label")]
        splits = self._split_file(root)
        if splits is not None:
            if split not in splits:
                raise ValueError(f"TextSeg split must be one of {sorted(splits)}, got {split!r}")
            ids = [str(s) for s in splits[split]]
        else:
            ids = sorted(images.images)
        for sid in ids:
            ipath = images.find(sid)
            lpath = label_folder.find(f"{sid}_maskfg", (".png",))
            if ipath is None:
                self.listing_problems.append(f"{sid}: no image {images.describe(sid)}")
            if lpath is None:
                self.listing_problems.append(
                    f"{sid}: no label {label_folder.describe(sid + '_maskfg', ('.png',))}")
            if ipath and lpath:
                anno = next(filter(None, (f.find(f"{sid}_anno", (".json",)) for f in annos)), None)
                inst = next(filter(None, (f.find(f"{sid}_mask", (".png",)) for f in instances)),
                            None)
                self.items.append(Sample(sid, ipath, lpath, anno, inst))
        self._finish(validate)

    @staticmethod
    def _split_file(root: str) -> dict | None:
        path = os.path.join(root, "split.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                splits = json.load(f)
            if not isinstance(splits, dict):
                raise ValueError(f"expected an object of id lists, got {type(splits).__name__}")
        except ValueError as e:
            raise ValueError(f"cannot read TextSeg split file {path!r}: {e}") from e
        return splits

    @classmethod
    def splits(cls, root: str) -> list[str]:
        splits = cls._split_file(root)
        return list(splits) if splits is not None else ["all"]   # no split.json: one list of all

    def read(self, i):
        s = self.items[i]
        raw = load_label(s.label)
        # 100 text, 0 and 200 (effect) background; 255 and any other value ignore (TexRNet keeps
        # other values as classes >= 2, which its evaluator ignores)
        mask = np.full(raw.shape, IGNORE, np.uint8)
        mask[(raw == 0) | (raw == 200)] = 0
        mask[raw == 100] = 1
        regions = None
        if s.annotation:
            instance = load_label(s.instance) if s.instance else None
            regions = read_textseg_annotation(s.annotation, instance)
        return load_image(s.image), mask, regions


def _polygon(entry) -> np.ndarray | None:
    """(K, 2) points of a TextSeg word or character entry; None if it has none. Two points are
    read as the corners of a box."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object with a polygon, got {type(entry).__name__}")
    for key in ("bbox", "poly", "polygon", "points"):
        v = entry.get(key)
        if v is not None and len(v):
            pts = np.asarray(v, np.float64).reshape(-1, 2)
            if len(pts) == 2:
                (x0, y0), (x1, y1) = pts
                pts = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
            return pts
    return None


def _instance_box(instance: np.ndarray | None, value) -> tuple | None:
    """The box (x0, y0, x1, y1), in pixel indices, of the pixels of `instance` equal to `value`
    (a character's "mask_value"); None without a mask, a value or such pixels."""
    if instance is None or value is None or isinstance(value, bool):
        return None
    ys, xs = np.nonzero(instance == int(value))
    if len(xs) == 0:
        return None
    return (xs.min(), ys.min(), xs.max(), ys.max())


_warned_annotations: set = set()


def read_textseg_annotation(path: str, instance: np.ndarray | None = None) -> TextRegions:
    """A TextSeg ``<id>_anno.json`` (module docstring) as TextRegions: a box per character (its
    polygon's bounding box, else the box of its "mask_value" pixels in the character instance mask
    `instance`), and the polygon of each word that has no character geometry."""
    boxes, words, keys = [], [], set()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for word in (data.values() if isinstance(data, dict) else data):
            if not isinstance(word, dict):
                raise ValueError(f"a word entry is a {type(word).__name__}, not an object")
            keys.update(word)
            chars = word.get("char") or {}
            chars = list(chars.values() if isinstance(chars, dict) else chars)
            found = []
            for c in chars:
                p = _polygon(c)
                if p is not None:
                    found.append((*p.min(0), *p.max(0)))
                else:
                    keys.update(c)
                    box = _instance_box(instance, c.get("mask_value"))
                    if box is not None:
                        found.append(box)
            if found:
                boxes += found
            elif (p := _polygon(word)) is not None:
                words.append(p)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read annotation {path!r}: {e}") from e
    if keys and not boxes and not words and path not in _warned_annotations:
        # The REM target silently falling back to the blurred mask would hide a format we do not
        # read; say so once per file.
        _warned_annotations.add(path)
        warnings.warn(f"{path}: no character or word geometry found (keys seen: "
                      f"{sorted(map(str, keys))}; expected a polygon under 'bbox', 'poly', "
                      f"'polygon' or 'points', or a character 'mask_value' with the instance "
                      f"mask <id>_mask.png); the REM target falls back to the blurred text mask",
                      stacklevel=2)
    return TextRegions(np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else None, words)


class TotalTextDataset(FileDataset):
    """Total-Text: see the module docstring. `split` is "train" or "test" (any case)."""

    what = "Total-Text"

    def __init__(self, root: str, split: str = "train", validate: bool = True, **kw):
        super().__init__(root, split, **kw)
        sub = {"train": "Train", "test": "Test"}.get(split.lower())
        if sub is None:
            raise ValueError(f"Total-Text split must be 'train' or 'test', got {split!r}")
        _require_dir(root, "Total-Text root")
        image_dir = os.path.join(root, "Images", sub)
        label_dir = os.path.join(root, "groundtruth_pixel", sub)
        _require_dir(image_dir, "Total-Text images")
        _require_dir(label_dir, "Total-Text labels")
        images, labels = _Folder(image_dir), _Folder(label_dir)
        for sid, names in sorted(images.images.items()):
            if len(names) > 1:
                self.listing_problems.append(f"{sid}: several images {names} in {image_dir}")
            lpath = labels.find(sid)
            if lpath is None:
                self.listing_problems.append(f"{sid}: no label {labels.describe(sid)}")
            else:
                self.items.append(Sample(sid, os.path.join(image_dir, names[0]), lpath))
        self._finish(validate)

    def read(self, i):
        s = self.items[i]
        mask = (load_label(s.label) > 127).astype(np.uint8)
        return load_image(s.image), mask, None


WHITE = 0xFFFFFF
TEXRNET_IGNORE = 999   # TexRNet's SEGLABEL_IGNORE_LABEL for ICDAR-2013 (configs/cfg_dataset.py)


def read_icdar13_chars(path: str) -> list[tuple[int, bool, tuple[int, int, int, int]]]:
    """The lines of an ICDAR-2013 ``*_GT.txt``: (colour as 0xRRGGBB, don't care, (x0, y0, x1, y1)).
    Lines that do not start with nine integers and a character are skipped (blank lines separate
    words), as TexRNet's parser skips them; their colours then count as unlisted (ignore)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip().lstrip("\ufeff")
            dont_care = line.startswith("#")
            parts = line.lstrip("#").split()
            if len(parts) < 10:
                continue
            try:
                r, g, b, _, _, x0, y0, x1, y1 = (int(p) for p in parts[:9])
            except ValueError:
                continue
            out.append(((r << 16) | (g << 8) | b, dont_care, (x0, y0, x1, y1)))
    return out


def icdar13_colour_label(rgb: np.ndarray, chars) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask, character boxes) of an ICDAR-2013 colour GT (H, W, 3) given its `read_icdar13_chars`
    lines, or None when there is no txt (then every non-white pixel is text)."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    if chars is None:
        return (code != WHITE).astype(np.uint8), None
    value = {WHITE: 0}                     # later lines win, as in TexRNet's colour map
    boxes = []
    for colour, dont_care, box in chars:
        value[colour] = IGNORE if dont_care else 1
        if not dont_care:
            boxes.append(box)
    colours, inverse = np.unique(code, return_inverse=True)
    lut = np.array([value.get(int(c), IGNORE) for c in colours], np.uint8)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else None
    return lut[inverse].reshape(code.shape), boxes


def _icdar13_layout(root: str, split: str):
    """(layout, image dir, label dir, char txt dir or None) of an ICDAR-2013 tree."""
    fst = os.path.join(root, "Focused_Scene_Text")
    addon = os.path.join(fst, "addon", f"{split}_image")
    if os.path.isdir(addon):
        return "texrnet_addon", addon, os.path.join(fst, "addon", f"{split}_label"), None
    base = os.path.join(fst, split)
    if os.path.isdir(base):
        return ("texrnet", os.path.join(base, "images"), os.path.join(base, "GT_Text_Segmentation"),
                os.path.join(base, "GT_Char_Localization"))
    tag = {"train": "Training", "test": "Test"}[split]
    rrc = os.path.join(root, f"Challenge2_{tag}_Task12_Images")
    if os.path.isdir(rrc):
        gt = os.path.join(root, f"Challenge2_{tag}_Task2_GT")
        return "rrc", rrc, gt, gt
    raise FileNotFoundError(f"ICDAR-2013 {split!r} split: no known layout under {root!r}; looked "
                            f"for {rrc!r}, {base!r} and {addon!r} (see armnet/data.py)")


class ICDAR13Dataset(FileDataset):
    """ICDAR-2013 Focused Scene Text in any of the three layouts of the module docstring (found
    automatically; `self.layout` names it). `split` is "train" or "test"."""

    what = "ICDAR-2013"

    def __init__(self, root: str, split: str = "train", validate: bool = True, **kw):
        super().__init__(root, split, **kw)
        split = split.lower()
        if split not in ("train", "test"):
            raise ValueError(f"ICDAR-2013 split must be 'train' or 'test', got {split!r}")
        _require_dir(root, "ICDAR-2013 root")
        self.layout, image_dir, label_dir, txt_dir = _icdar13_layout(root, split)
        _require_dir(image_dir, "ICDAR-2013 images")
        _require_dir(label_dir, "ICDAR-2013 labels")
        images, labels = _Folder(image_dir), _Folder(label_dir)
        txts = _Folder(txt_dir) if txt_dir else None
        for sid, names in sorted(images.images.items()):
            if len(names) > 1:
                self.listing_problems.append(f"{sid}: several images {names} in {image_dir}")
            if self.layout == "texrnet_addon":
                stems, exts = [f"{sid}_seglabel"], (".png",)
                anno = labels.find(f"{sid}_charbbox", (".json",))
            else:
                stems, exts = [f"{sid}_GT", f"gt_{sid}"], (".bmp", ".png")
                anno = txts.find(f"{sid}_GT", (".txt",))
            lpath = next(filter(None, (labels.find(st, exts) for st in stems)), None)
            if lpath is None:
                self.listing_problems.append(
                    f"{sid}: no label {' or '.join(labels.describe(st, exts) for st in stems)}")
            else:
                self.items.append(Sample(sid, os.path.join(image_dir, names[0]), lpath, anno))
        self._finish(validate)

    def read(self, i):
        s = self.items[i]
        if self.layout == "texrnet_addon":
            raw = load_label(s.label)
            mask = (raw > 0).astype(np.uint8)
            mask[(raw == TEXRNET_IGNORE) | (raw == IGNORE)] = IGNORE
            boxes = _read_addon_charbbox(s.annotation) if s.annotation else None
        else:
            rgb = np.asarray(load_image(s.label, "RGB", what="label"))
            mask, boxes = icdar13_colour_label(
                rgb, read_icdar13_chars(s.annotation) if s.annotation else None)
        return load_image(s.image), mask, boxes


def _read_addon_charbbox(path: str) -> np.ndarray | None:
    """Character boxes (x0, y0, x1, y1) from TexRNet's ``<id>_charbbox.json`` rows
    [y0, x0, y1, x1, class, instance, ...]; rows of ignored instances are left out."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        boxes = [(r[1], r[0], r[3], r[2]) for r in rows
                 if int(r[5]) not in (TEXRNET_IGNORE, IGNORE)]
    except (OSError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"cannot read character boxes {path!r}: {e}") from e
    return np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else None


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


def textseg_annotation(boxes) -> dict:
    """Character boxes (K, 4) as a TextSeg ``_anno.json`` object: one word whose characters are
    the boxes as 4-point polygons (what `read_textseg_annotation` reads back as the same boxes)."""
    rect = lambda x0, y0, x1, y1: [x0, y0, x1, y0, x1, y1, x0, y1]   # noqa: E731
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).tolist()
    if not boxes:
        return {}
    chars = {f"{k:02d}": {"text": "", "bbox": rect(*b), "mask_value": k + 1}
             for k, b in enumerate(boxes)}
    b = np.asarray(boxes)
    word = rect(*b[:, :2].min(0).tolist(), *b[:, 2:].max(0).tolist())
    return {"0000": {"text": "", "bbox": word, "char": chars}}


def write_synthetic(out_dir: str, length: int, seed: int, size=(128, 128),
                    split: str = "test") -> None:
    """Writes a synthetic set in the TextSeg layout (PNG images; annotation/<id>_anno.json)."""
    ds = SyntheticTextDataset(length, seed, size, rem_target=None)
    for sub in ("image", "semantic_label", "annotation"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    ids = []
    for i in range(length):
        img, mask, boxes = ds.read(i)
        sid = ds.item_id(i)
        ids.append(sid)
        img.save(os.path.join(out_dir, "image", f"{sid}.png"))
        Image.fromarray(np.uint8(mask) * 100).save(
            os.path.join(out_dir, "semantic_label", f"{sid}_maskfg.png"))
        with open(os.path.join(out_dir, "annotation", f"{sid}_anno.json"), "w") as f:
            json.dump(textseg_annotation(boxes), f)
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


def check_data(name: str, root: str, deep: bool = True, out=print) -> bool:
    """`python -m armnet check-data`: lists every split of dataset `name` at `root` with the
    loaders' own code, prints the image count of each and every problem found (with `deep`, after
    a full `read` of every sample: decode, labels, annotations); True if there is none."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    cls = DATASETS[name]
    _require_dir(root, f"{cls.what} root")
    total = 0
    for split in cls.splits(root):
        try:
            ds = cls(root, split, validate=False, rem_target=None)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            out(f"{split}: cannot list it: {e}")
            total += 1
            continue
        problems = ds.problems(deep=deep, progress=True)
        layout = f", {ds.layout} layout" if hasattr(ds, "layout") else ""
        labels = f", labels {cls.LABEL_DIRS[ds.labels]}" if hasattr(ds, "labels") else ""
        out(f"{split}: {len(ds)} images{layout}{labels}, {len(problems)} problem(s)")
        for p in problems:
            out(f"  {p}")
        total += len(problems)
    how = "every sample read in full" if deep else "headers only"
    out(f"{cls.what} at {root}: " + ("no problems" if total == 0 else f"{total} problem(s)")
        + f" ({how})")
    return total == 0


def collate(batch):
    """Stacks same-size samples; evaluation uses batch size 1 for images of different sizes."""
    return {"image": torch.stack([b["image"] for b in batch]),
            "mask": torch.stack([b["mask"] for b in batch]),
            "rem_target": torch.stack([b["rem_target"] for b in batch]),
            "id": [b["id"] for b in batch]}
