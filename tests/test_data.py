"""Data: the three on-disk layouts on tiny fixture trees, the synthetic generator, augmentation,
REM targets and bad input."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from armnet.data import (IGNORE, ICDAR13Dataset, SyntheticTextDataset, TextSegDataset,
                         TotalTextDataset, TrainAugment, build_dataset, denormalize,
                         gaussian_text_map, normalize, polygon_gaussian_map, resize_label,
                         write_synthetic)
from armnet.synth import font_files, render_sample

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def textseg_root(tmp_path):
    root = tmp_path / "TextSeg"
    (root / "image").mkdir(parents=True)
    (root / "semantic_label").mkdir()
    for i, sid in enumerate(["a1", "b2", "c3"]):
        Image.fromarray(_rgb(10, 12, i)).save(root / "image" / f"{sid}.jpg")
        lab = np.zeros((10, 12), np.uint8)
        lab[1:3, 1:5] = 100      # text
        lab[5:7, 2:4] = 200      # text effect -> background
        lab[8, :] = 255          # ignore
        Image.fromarray(lab).save(root / "semantic_label" / f"{sid}_maskfg.png")
    (root / "split.json").write_text(json.dumps({"train": ["a1", "b2"], "test": ["c3"]}))
    return root


def test_textseg_layout_and_label_mapping(textseg_root):
    train = TextSegDataset(str(textseg_root), "train")
    test = TextSegDataset(str(textseg_root), "test")
    assert len(train) == 2 and len(test) == 1 and test[0]["id"] == "c3"
    s = train[0]
    assert s["image"].shape == (3, 10, 12) and s["image"].dtype == torch.float32
    m = s["mask"]
    assert m.dtype == torch.int64 and m.shape == (10, 12)
    assert (m[1:3, 1:5] == 1).all()
    assert (m[5:7, 2:4] == 0).all()        # 200 = effect is background
    assert (m[8] == IGNORE).all()
    assert int((m == 1).sum()) == 8
    assert s["rem_target"].shape == (1, 10, 12)
    with pytest.raises(ValueError, match="split"):
        TextSegDataset(str(textseg_root), "val")


def test_textseg_without_split_json_lists_all(textseg_root):
    (textseg_root / "split.json").unlink()
    assert len(TextSegDataset(str(textseg_root), "train")) == 3


def test_totaltext_layout_threshold(tmp_path):
    root = tmp_path / "TT"
    for sub in ("Train", "Test"):
        (root / "Images" / sub).mkdir(parents=True)
        (root / "groundtruth_pixel" / sub).mkdir(parents=True)
    Image.fromarray(_rgb(8, 8, 0)).save(root / "Images" / "Train" / "img1.jpg")
    gt = np.zeros((8, 8), np.uint8)
    gt[2:4, 2:6] = 255
    gt[6, 6] = 127           # not text (needs > 127)
    gt[7, 7] = 128           # text
    Image.fromarray(gt).save(root / "groundtruth_pixel" / "Train" / "img1.png")
    ds = TotalTextDataset(str(root), "train")
    assert len(ds) == 1 and len(TotalTextDataset(str(root), "Test")) == 0
    m = ds[0]["mask"]
    assert int(m.sum()) == 9 and m[7, 7] == 1 and m[6, 6] == 0
    with pytest.raises(ValueError, match="split"):
        TotalTextDataset(str(root), "val")


def test_icdar13_layout_colours_and_dont_care(tmp_path):
    base = tmp_path / "IC13" / "Focused_Scene_Text" / "test"
    for sub in ("images", "GT_Text_Segmentation", "GT_Char_Localization"):
        (base / sub).mkdir(parents=True)
    Image.fromarray(_rgb(8, 10, 1)).save(base / "images" / "5.jpg")
    gt = np.full((8, 10, 3), 255, np.uint8)
    gt[1:4, 1:3] = (10, 20, 30)       # character 1
    gt[1:4, 5:7] = (200, 0, 0)        # character 2, marked don't-care below
    Image.fromarray(gt).save(base / "GT_Text_Segmentation" / "5_GT.bmp")
    (base / "GT_Char_Localization" / "5_GT.txt").write_text(
        '10 20 30 2 2 1 1 3 4 "A"\n# 200 0 0 6 2 5 1 7 4 "B"\n')
    ds = ICDAR13Dataset(str(tmp_path / "IC13"), "test")
    s = ds[0]
    m = s["mask"]
    assert (m[1:4, 1:3] == 1).all() and (m[1:4, 5:7] == IGNORE).all()
    assert int((m == 1).sum()) == 6 and int((m == IGNORE).sum()) == 6
    # the REM target comes from the one valid character box: peak at its centre
    r = s["rem_target"][0]
    assert r.max() <= 1 and r[2, 2] == pytest.approx(1.0, abs=0.2) and r[2, 8] == 0


def test_missing_dataset_dirs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TextSeg root.*not found"):
        TextSegDataset(str(tmp_path / "nope"))
    (tmp_path / "ts" / "image").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="TextSeg labels"):
        TextSegDataset(str(tmp_path / "ts"))
    with pytest.raises(FileNotFoundError, match="Total-Text root"):
        TotalTextDataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="ICDAR-2013"):
        ICDAR13Dataset(str(tmp_path))
    with pytest.raises(ValueError, match="--data-root"):
        build_dataset("textseg", None)
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_dataset("coco", str(tmp_path))


def test_corrupt_image_raises_with_file_name(textseg_root):
    bad = textseg_root / "image" / "b2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    # found when the dataset is built, not mid-epoch
    with pytest.raises(RuntimeError, match="(?s)1 problem.*b2.jpg.*corrupt"):
        TextSegDataset(str(textseg_root), "train")
    ds = TextSegDataset(str(textseg_root), "train", validate=False)
    ds[0]  # a1 is fine
    with pytest.raises(RuntimeError, match="b2.jpg.*corrupt"):
        ds[1]


def test_truncated_image_raises(textseg_root):
    path = textseg_root / "image" / "a1.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="a1.jpg"):
        TextSegDataset(str(textseg_root), "train")[0]


# ---- synthetic ------------------------------------------------------------------------------------

def test_fonts_are_real_fonts():
    # Either system TrueType fonts or Pillow's built-in FreeType font must be usable.
    from armnet.synth import _font
    f = _font(font_files()[0] if font_files() else None, 20)
    assert f.getbbox("Ag")[2] > 10


def test_synthetic_is_deterministic_and_seed_dependent():
    a = render_sample(np.random.default_rng((3, 7)), (64, 80))
    b = render_sample(np.random.default_rng((3, 7)), (64, 80))
    c = render_sample(np.random.default_rng((4, 7)), (64, 80))
    assert a[0].shape == (64, 80, 3) and a[1].shape == (64, 80)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_synthetic_masks_and_boxes_are_consistent():
    total = 0
    for i in range(12):
        img, mask, boxes = render_sample(np.random.default_rng((0, i)), (96, 96))
        assert set(np.unique(mask)) <= {0, 1}
        assert boxes.ndim == 2 and boxes.shape[1] == 4
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 96).all()
        # every text pixel lies in some character box (boxes cover the glyphs)
        ys, xs = np.nonzero(mask)
        inside = np.zeros(len(ys), bool)
        for x0, y0, x1, y1 in boxes:
            inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        assert inside.all()
        total += mask.sum()
    assert total > 0


def test_synthetic_dataset_and_writer_roundtrip(tmp_path):
    ds = SyntheticTextDataset(3, seed=9, size=(32, 40), cache=True)
    s = ds[1]
    assert s["image"].shape == (3, 32, 40) and s["id"] == "synth_9_000001"
    write_synthetic(str(tmp_path / "syn"), 3, 9, (32, 40), split="test")
    back = TextSegDataset(str(tmp_path / "syn"), "test")
    assert len(back) == 3
    torch.testing.assert_close(back[1]["mask"], s["mask"])
    torch.testing.assert_close(back[1]["rem_target"], s["rem_target"])  # boxes in annotation/


# ---- augmentation / normalisation / REM targets ----------------------------------------------

def test_augment_crop_pad_and_flip_move_image_and_mask_together():
    h, w = 20, 30
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[:, :10] = 1
    mask[5:7, 14:27:3] = 1   # thin strokes: a label shifted by half a pixel would miss them
    image = mask[None].repeat(3, 1, 1).float() * 200   # the image encodes the mask
    rem = mask[None].float()
    aug = TrainAugment(crop_size=(24, 24), scale=(0.8, 1.6), flip=0.5)
    for seed in range(8):
        im, m, r = aug(image, mask, rem, np.random.default_rng(seed))
        assert im.shape == (3, 24, 24) and m.shape == (24, 24) and r.shape == (1, 24, 24)
        valid = m != IGNORE
        # image and label are resampled on one grid: where the label is valid they agree exactly
        assert ((im[0] > 100) == (m == 1))[valid].all()
    small = TrainAugment(crop_size=(40, 40), scale=(1.0, 1.0), flip=0.0)
    im, m, _ = small(image, mask, rem, np.random.default_rng(0))
    assert (m[20:] == IGNORE).all() and (m[:, 30:] == IGNORE).all() and (im[:, 20:] == 0).all()


def test_augment_flip_probability():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(3, 2, 4)
    mask = torch.zeros(2, 4, dtype=torch.long)
    mask[:, 0] = 1
    rem = mask[None].float()
    for p, flipped in ((0.0, False), (1.0, True)):
        aug = TrainAugment(crop_size=None, scale=(1.0, 1.0), flip=p)
        for seed in range(4):
            im, m, r = aug(image, mask, rem, np.random.default_rng(seed))
            assert torch.equal(im, image.flip(-1) if flipped else image)
            assert torch.equal(m, mask.flip(-1) if flipped else mask)
            assert torch.equal(r, rem.flip(-1) if flipped else rem)


@pytest.mark.parametrize("kw,match", [({"flip": 1.5}, "flip must be a probability"),
                                      ({"flip": -0.1}, "got -0.1"),
                                      ({"scale": (1.2, 0.8)}, r"scale must be .* got \(1.2, 0.8\)"),
                                      ({"scale": (0.0, 1.0)}, "0 < min")])
def test_augment_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainAugment(**kw)


def test_resize_label_keeps_text_and_ignore_in_place():
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[2:4, 3:5] = 1
    mask[6:, 6:] = IGNORE
    up = resize_label(mask, (16, 16))
    assert up.unique().tolist() == [0, 1, IGNORE]
    assert (up[4:8, 6:10] == 1).all() and (up == 1).sum() == 16
    assert (up[12:, 12:] == IGNORE).all() and (up == IGNORE).sum() == 16
    # the square's centre (2.5, 3.5) maps to (1.75, 2.5) at 6/8 scale: text at (2, 2) and
    # (2, 3); legacy nearest sampled at floor(i * 8 / 6) and kept only (2, 3)
    down = resize_label(mask, (6, 6))
    assert (down == 1).nonzero().tolist() == [[2, 2], [2, 3]]


def test_normalize_roundtrip():
    x = torch.rand(3, 4, 5) * 255
    torch.testing.assert_close(denormalize(normalize(x)), x, rtol=1e-4, atol=1e-3)
    assert normalize(torch.full((3, 1, 1), 255 * 0.485))[0].abs().max() < 1e-5


def test_gaussian_map_from_char_boxes_and_from_mask():
    mask = np.zeros((20, 20), np.uint8)
    g = gaussian_text_map(mask, np.array([[4, 4, 12, 8]], np.float32))
    assert g.max() == pytest.approx(1.0, abs=1e-6) or g[6, 8] == pytest.approx(1.0)
    assert g[6, 8] == pytest.approx(1.0, abs=1e-6)
    # σx = 2, σy = 1: one σ off-centre gives exp(-1/2)
    assert g[6, 10] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert g[7, 8] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert g[18, 18] == 0
    mask[5:9, 5:15] = 1
    mask[0, 0] = IGNORE
    b = gaussian_text_map(mask, None)
    assert b.max() == pytest.approx(1.0) and b[7, 10] > 0.5 and b[0, 0] < 0.05 and b[19, 0] == 0
    assert gaussian_text_map(np.zeros((4, 4), np.uint8), None).max() == 0
    p = polygon_gaussian_map((20, 20), [[(2, 2), (17, 2), (17, 8), (2, 8)]])
    assert p.max() == pytest.approx(1.0) and p[5, 9] > 0.8 and p[18, 18] < 0.01


def test_pluggable_rem_target(textseg_root):
    ds = TextSegDataset(str(textseg_root), "train", rem_target=lambda m, b: np.full(m.shape, 0.25))
    assert torch.all(ds[0]["rem_target"] == 0.25)


def test_palette_label_keeps_raw_values(textseg_root):
    lab = np.zeros((10, 12), np.uint8)
    lab[0:2, 0:2] = 100
    lab[9, 9] = 255
    im = Image.fromarray(lab).convert("P")
    im.putpalette([0, 0, 0] * 256)  # a palette that maps every value to black
    im.save(textseg_root / "semantic_label" / "a1_maskfg.png")
    m = TextSegDataset(str(textseg_root), "train")[0]["mask"]
    assert int((m == 1).sum()) == 4 and m[9, 9] == IGNORE
