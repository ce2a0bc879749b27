"""Loaders on small fixture trees written in the layouts of the real releases, with their quirks:
Total-Text's upper-case extensions, TextSeg's semantic_label_v1 and annotation/<id>_anno.json,
ICDAR-2013 as the Robust Reading download and as TexRNet's rearranged copy; a tree with missing
and unreadable files gives one error that lists them all; `check-data` reports the same."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from armnet.cli import main
from armnet.data import (IGNORE, DatasetError, ICDAR13Dataset, TextRegions, TextSegDataset,
                         TotalTextDataset, build_dataset, check_data, gaussian_text_map,
                         read_textseg_annotation)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _grey(arr):
    return Image.fromarray(np.asarray(arr, np.uint8))


# ---- Total-Text ---------------------------------------------------------------------------------

@pytest.fixture
def totaltext_root(tmp_path):
    """Images/{Train,Test}, groundtruth_pixel/{Train,Test}, JPEG masks; the release's
    groundtruth_pixel/Train/img61.JPG has an upper-case extension (here an image too)."""
    root = tmp_path / "totaltext"
    for d in ("Images/Train", "Images/Test", "groundtruth_pixel/Train", "groundtruth_pixel/Test"):
        (root / d).mkdir(parents=True)
    gt = np.zeros((16, 20), np.uint8)
    gt[4:10, 3:15] = 255
    for sid, img_name, gt_name in (("img61", "img61.jpg", "img61.JPG"),
                                   ("img7", "img7.JPG", "img7.jpg"),
                                   ("img1", "img1.jpg", "img1.jpg")):
        _rgb(16, 20).save(root / "Images/Train" / img_name, format="JPEG")
        _grey(gt).save(root / "groundtruth_pixel/Train" / gt_name, format="JPEG", quality=95)
    _rgb(16, 20).save(root / "Images/Test/img2.jpg")
    _grey(gt).save(root / "groundtruth_pixel/Test/img2.jpg")
    return root


def test_totaltext_upper_case_extensions(totaltext_root):
    ds = TotalTextDataset(str(totaltext_root), "train")
    assert [ds.item_id(i) for i in range(len(ds))] == ["img1", "img61", "img7"]
    for i in range(3):
        m = ds[i]["mask"]
        # JPEG-compressed mask thresholded at 127: the text block, nothing else
        assert (m[5:9, 4:14] == 1).all() and m[:3].sum() == 0 and m[12:].sum() == 0
    assert len(TotalTextDataset(str(totaltext_root), "test")) == 1


def test_totaltext_every_problem_in_one_error_at_build(totaltext_root, capsys):
    (totaltext_root / "groundtruth_pixel/Train/img61.JPG").unlink()          # missing label
    (totaltext_root / "groundtruth_pixel/Train/img7.jpg").write_bytes(b"not an image")
    _rgb(10, 10).save(totaltext_root / "Images/Train/img1.jpg")              # size mismatch
    with pytest.raises(DatasetError) as err:
        TotalTextDataset(str(totaltext_root), "train")
    msg = str(err.value)
    assert "3 problem(s)" in msg and len(err.value.problems) == 3
    assert "img61: no label" in msg and "img61.{jpg,jpeg,png,bmp}" in msg
    assert "img7: cannot read label" in msg and "img7.jpg" in msg
    assert "img1: image size (10, 10) != label size (16, 20)" in msg
    # the CLI turns it into one message and exit code 2, with no traceback, before it loads the
    # checkpoint (which does not exist here)
    assert main(["eval", "--checkpoint", "unused.pt", "--dataset", "totaltext", "--data-root",
                 str(totaltext_root), "--split", "train", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "armnet eval: error: Total-Text 'train' split" in err and "3 problem(s)" in err
    assert "img61: no label" in err and "Traceback" not in err


def test_check_data_prints_counts_and_every_problem(totaltext_root, capsys):
    assert main(["check-data", "--dataset", "totaltext", "--data-root", str(totaltext_root)]) == 0
    out = capsys.readouterr().out
    assert "train: 3 images" in out and "test: 1 images" in out and "no problems" in out
    (totaltext_root / "groundtruth_pixel/Test/img2.jpg").unlink()
    # truncated: the header still reads, so only the full check (decode) finds it
    path = totaltext_root / "Images/Train/img7.JPG"
    path.write_bytes(path.read_bytes()[:-100])
    lines = []
    assert check_data("totaltext", str(totaltext_root), deep=True, out=lines.append) is False
    text = "\n".join(lines)
    assert "img2: no label" in text and "img7: cannot read image" in text
    assert "2 problem(s)" in lines[-1]
    lines = []
    check_data("totaltext", str(totaltext_root), deep=False, out=lines.append)
    assert "img7" not in "\n".join(lines) and "1 problem(s)" in lines[-1]
    assert main(["check-data", "--dataset", "totaltext", "--data-root", str(totaltext_root)]) == 1


# ---- TextSeg ------------------------------------------------------------------------------------

def _textseg_label():
    lab = np.zeros((24, 32), np.uint8)
    lab[2:8, 2:10] = 100     # text
    lab[10:12, 2:10] = 200   # text effect -> background
    lab[20, :] = 255         # ignore
    lab[22, 0] = 50          # a value TextSeg does not define -> ignore (as TexRNet's evaluator)
    return lab


@pytest.fixture
def textseg_v1_root(tmp_path):
    """The release's layout with only semantic_label_v1 (the paper's labels) and annotations."""
    root = tmp_path / "TextSeg"
    for d in ("image", "semantic_label_v1", "annotation"):
        (root / d).mkdir(parents=True)
    for i, sid in enumerate(("a01", "b02")):
        _rgb(24, 32, i).save(root / "image" / f"{sid}.jpg")
        _grey(_textseg_label()).save(root / "semantic_label_v1" / f"{sid}_maskfg.png")
    anno = {"0000": {"text": "AB", "bbox": [1, 1, 11, 1, 11, 9, 1, 9],
                     "char": {"00": {"text": "A", "bbox": [2, 2, 6, 2, 6, 8, 2, 8], "mask_value": 1},
                              "01": {"text": "B", "bbox": [6, 2, 10, 2, 10, 8, 6, 8],
                                     "mask_value": 2}}},
            "0001": {"text": "CD", "bbox": [[14, 12], [30, 12], [30, 22], [14, 22]], "char": {}}}
    (root / "annotation" / "a01_anno.json").write_text(json.dumps(anno))
    (root / "split.json").write_text(json.dumps({"train": ["a01"], "val": [], "test": ["b02"]}))
    return root


def test_textseg_semantic_label_v1_and_label_values(textseg_v1_root):
    ds = TextSegDataset(str(textseg_v1_root), "train")
    assert ds.labels == "v1" and len(ds) == 1
    m = ds[0]["mask"]
    assert (m[2:8, 2:10] == 1).all() and int((m == 1).sum()) == 48
    assert (m[10:12, 2:10] == 0).all() and (m[20] == IGNORE).all() and m[22, 0] == IGNORE
    # both folders present: "auto" takes v2, "v1" the paper's labels
    (textseg_v1_root / "semantic_label").mkdir()
    v2 = np.zeros((24, 32), np.uint8)
    _grey(v2).save(textseg_v1_root / "semantic_label" / "a01_maskfg.png")
    _grey(v2).save(textseg_v1_root / "semantic_label" / "b02_maskfg.png")
    assert (TextSegDataset(str(textseg_v1_root), "train")[0]["mask"] == 1).sum() == 0
    assert (TextSegDataset(str(textseg_v1_root), "train", labels="v1")[0]["mask"] == 1).sum() == 48
    with pytest.raises(ValueError, match="labels must be 'auto', 'v2' or 'v1', got 'v3'"):
        TextSegDataset(str(textseg_v1_root), "train", labels="v3")


def test_textseg_rem_target_from_character_then_word_polygons(textseg_v1_root):
    regions = read_textseg_annotation(str(textseg_v1_root / "annotation" / "a01_anno.json"))
    # word 0 has characters: their boxes; word 1 has none: its polygon
    np.testing.assert_array_equal(regions.char_boxes, [[2, 2, 6, 8], [6, 2, 10, 8]])
    assert len(regions.word_polygons) == 1
    np.testing.assert_array_equal(regions.word_polygons[0], [[14, 12], [30, 12], [30, 22], [14, 22]])
    r = TextSegDataset(str(textseg_v1_root), "train")[0]["rem_target"][0]
    assert r[5, 4] == pytest.approx(1.0) and r[5, 8] == pytest.approx(1.0)   # character centres
    assert r[17, 22] == pytest.approx(1.0, abs=0.02)                        # the word's centre
    assert r[5, 6] < 0.7                                                     # between two chars
    assert r[22, 2] < 1e-3                                                   # far from both
    # the word's polygon, not the blurred mask: the mask has no text under that word
    assert TextSegDataset(str(textseg_v1_root), "train")[0]["mask"][17, 22] == 0
    # an image without an annotation file falls back to the blurred text mask
    test = TextSegDataset(str(textseg_v1_root), "test")[0]
    assert test["rem_target"][0, 17, 22] == 0 and test["rem_target"].max() == pytest.approx(1.0)


def test_textseg_character_boxes_from_the_instance_mask(textseg_v1_root):
    """A character without a polygon takes the box of its "mask_value" pixels in the instance
    mask <id>_mask.png (how TexRNet gets its character boxes), in annotation/ or instance_label/."""
    anno = {"0000": {"text": "AB", "char": {"00": {"text": "A", "mask_value": 3},
                                            "01": {"text": "B", "mask_value": 7}}}}
    (textseg_v1_root / "annotation" / "a01_anno.json").write_text(json.dumps(anno))
    inst = np.zeros((24, 32), np.uint8)
    inst[2:9, 3:6] = 3        # A: columns 3-5, rows 2-8
    inst[4:7, 20:30] = 7      # B: columns 20-29, rows 4-6
    inst[0, 0] = 255          # TexRNet's ignore value, no character
    for folder in ("annotation", "instance_label"):
        (textseg_v1_root / folder).mkdir(exist_ok=True)
        _grey(inst).save(textseg_v1_root / folder / "a01_mask.png")
        regions = TextSegDataset(str(textseg_v1_root), "train").read(0)[2]
        np.testing.assert_array_equal(regions.char_boxes, [[3, 2, 5, 8], [20, 4, 29, 6]])
        r = TextSegDataset(str(textseg_v1_root), "train")[0]["rem_target"][0]
        assert r[5, 4] == pytest.approx(1.0) and min(r[5, 24], r[5, 25]) > 0.9  # the centres
        (textseg_v1_root / folder / "a01_mask.png").unlink()
    # without the mask there is no geometry at all: a warning names the keys it saw, once
    with pytest.warns(UserWarning, match=r"no character or word geometry.*'mask_value'"):
        regions = read_textseg_annotation(str(textseg_v1_root / "annotation" / "a01_anno.json"))
    assert regions.char_boxes is None and regions.word_polygons == []


def test_textseg_rem_target_is_pluggable_and_sees_the_regions(textseg_v1_root):
    seen = []
    ds = TextSegDataset(str(textseg_v1_root), "train",
                        rem_target=lambda m, r: seen.append(r) or np.zeros(m.shape, np.float32))
    ds[0]
    assert isinstance(seen[0], TextRegions) and len(seen[0].char_boxes) == 2
    g = gaussian_text_map(np.zeros((24, 32), np.uint8), TextRegions(None, []))
    assert g.max() == 0


def test_textseg_missing_and_bad_files_listed_together(textseg_v1_root):
    (textseg_v1_root / "split.json").write_text(
        json.dumps({"train": ["a01", "b02", "c03", "d04"]}))
    _rgb(24, 32).save(textseg_v1_root / "image" / "c03.JPG")      # image, no label
    _grey(_textseg_label()).save(textseg_v1_root / "semantic_label_v1" / "d04_maskfg.png")
    (textseg_v1_root / "semantic_label_v1" / "b02_maskfg.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError) as err:
        TextSegDataset(str(textseg_v1_root), "train")
    probs = err.value.problems
    assert len(probs) == 3
    assert any(p.startswith("c03: no label") for p in probs)
    assert any(p.startswith("d04: no image") and "d04.{jpg" in p for p in probs)
    assert any(p.startswith("b02: cannot read label") for p in probs)
    # a broken annotation is found by the full check, with its file name
    (textseg_v1_root / "annotation" / "a01_anno.json").write_text("{ not json")
    lines = []
    assert not check_data("textseg", str(textseg_v1_root), out=lines.append)
    assert any("a01: cannot read annotation" in line and "a01_anno.json" in line
               for line in lines)


# ---- ICDAR-2013 -----------------------------------------------------------------------------------

def _icdar_colour_gt():
    gt = np.full((20, 24, 3), 255, np.uint8)
    gt[2:8, 2:6] = (10, 20, 30)       # character "A", listed
    gt[2:8, 8:12] = (200, 0, 0)       # character "B", listed as don't care
    gt[12:16, 2:6] = (0, 90, 0)       # a colour the txt does not list
    return gt


GT_TXT = ('10 20 30 3 4 2 2 5 7 "A"\n'
          '# 200 0 0 9 4 8 2 11 7 "B"\n'
          '\n')


@pytest.fixture
def icdar_rrc_root(tmp_path):
    """The Robust Reading download, each zip unzipped into a folder named after it."""
    root = tmp_path / "icdar13"
    for d in ("Challenge2_Training_Task12_Images", "Challenge2_Training_Task2_GT",
              "Challenge2_Test_Task12_Images", "Challenge2_Test_Task2_GT"):
        (root / d).mkdir(parents=True)
    _rgb(20, 24).save(root / "Challenge2_Training_Task12_Images/100.jpg")
    Image.fromarray(_icdar_colour_gt()).save(root / "Challenge2_Training_Task2_GT/100_GT.bmp")
    (root / "Challenge2_Training_Task2_GT/100_GT.txt").write_text(GT_TXT)
    _rgb(20, 24).save(root / "Challenge2_Test_Task12_Images/img_1.jpg")
    test_gt = np.full((20, 24, 3), 255, np.uint8)
    test_gt[5:9, 4:10] = 0            # black text on white, no txt
    Image.fromarray(test_gt).save(root / "Challenge2_Test_Task2_GT/gt_img_1.png")
    return root


def test_icdar13_rrc_layout_colours_like_texrnet(icdar_rrc_root):
    ds = ICDAR13Dataset(str(icdar_rrc_root), "train")
    assert ds.layout == "rrc" and len(ds) == 1
    s = ds[0]
    m = s["mask"]
    assert (m[2:8, 2:6] == 1).all() and int((m == 1).sum()) == 24
    assert (m[2:8, 8:12] == IGNORE).all()        # don't care
    assert (m[12:16, 2:6] == IGNORE).all()       # not listed in the txt: ignore, as TexRNet
    assert int((m == IGNORE).sum()) == 40 and m[18, 20] == 0
    # the REM target: one Gaussian on the listed character's box (2, 2, 5, 7): centre (3.5, 4.5),
    # sigma (0.75, 1.25); none on "B"
    r = s["rem_target"][0]
    assert r[4, 3] == pytest.approx(math.exp(-0.25 / 1.125 - 0.25 / 3.125), rel=1e-5)
    assert r[4, 3] == r[5, 4] and r[4, 10] < 1e-3
    test = ICDAR13Dataset(str(icdar_rrc_root), "test")
    assert test.layout == "rrc" and test.item_id(0) == "img_1"
    tm = test[0]["mask"]
    assert int(tm.sum()) == 24 and (tm[5:9, 4:10] == 1).all()


def test_icdar13_texrnet_addon_layout(tmp_path):
    """TexRNet's rearranged copy (FROM_SOURCE = 'addon'): instance labels, 999 = ignore (16-bit
    PNG), character boxes as [y0, x0, y1, x1, class, instance] rows."""
    base = tmp_path / "ic13" / "Focused_Scene_Text" / "addon"
    (base / "test_image").mkdir(parents=True)
    (base / "test_label").mkdir()
    _rgb(20, 24).save(base / "test_image" / "img_3.jpg")
    lab = np.zeros((20, 24), np.uint16)
    lab[2:8, 2:6] = 1
    lab[2:8, 8:12] = 2
    lab[12:16, 2:6] = 999
    Image.fromarray(lab).save(base / "test_label" / "img_3_seglabel.png")
    (base / "test_label" / "img_3_charbbox.json").write_text(json.dumps(
        [[2, 2, 8, 6, 10, 1, "A"], [2, 8, 8, 12, 11, 2, "B"], [12, 2, 16, 6, 36, 999, "?"]]))
    ds = ICDAR13Dataset(str(tmp_path / "ic13"), "test")
    assert ds.layout == "texrnet_addon"
    s = ds[0]
    m = s["mask"]
    assert int((m == 1).sum()) == 48 and (m[12:16, 2:6] == IGNORE).all() and m[18, 20] == 0
    r = s["rem_target"][0]
    assert r[5, 4] == pytest.approx(1.0) and r[5, 10] == pytest.approx(1.0) and r[14, 4] < 1e-3


def test_icdar13_unknown_layout_and_missing_label(tmp_path, icdar_rrc_root):
    with pytest.raises(FileNotFoundError, match="no known layout.*Challenge2_Training_Task12_Images"):
        ICDAR13Dataset(str(tmp_path), "train")
    (icdar_rrc_root / "Challenge2_Test_Task2_GT/gt_img_1.png").unlink()
    _rgb(20, 24).save(icdar_rrc_root / "Challenge2_Test_Task12_Images/img_2.JPG")
    with pytest.raises(DatasetError) as err:
        build_dataset("icdar13", str(icdar_rrc_root), "test")
    assert [p.split(":")[0] for p in err.value.problems] == ["img_1", "img_2"]
    assert "img_2_GT.{bmp,png} or " in err.value.problems[1]
