"""Metrics against TexRNet's published formula (lib/evaluate_service.py of
SHI-Labs/Rethinking-Text-Segmentation): hand-computed cases, then a held-out comparison with an
independent numpy transcription that follows TexRNet's own route (a confusion matrix per image
with ignore as a third class, bincount, per-class intersection and union)."""
import numpy as np
import pytest
import torch

from armnet.metrics import TextSegMetrics, format_table


def _run(*pairs):
    m = TextSegMetrics()
    for pred, gt in pairs:
        m.update(torch.tensor(pred), torch.tensor(gt))
    return m.compute()


def test_empty_prediction_scores_zero_precision():
    # TexRNet: precision of an image with no predicted text pixel is 0, not 1
    r = _run(([[0, 0, 0, 0]], [[1, 1, 0, 0]]))
    assert r["P"] == 0 and r["R"] == 0 and r["F"] == 0


def test_image_without_text_scores_zero_recall_and_counts_in_both_means():
    # image 1: perfect (P 1, R 1); image 2: no text, nothing predicted: P 0 and R 0 by TexRNet's rule
    r = _run(([[1, 1, 0]], [[1, 1, 0]]), ([[0, 0, 0]], [[0, 0, 0]]))
    assert r["P"] == pytest.approx(0.5) and r["R"] == pytest.approx(0.5)
    assert r["F"] == pytest.approx(0.5)
    assert r["images"] == 2 and r["images_without_text"] == 1
    # the pooled counts are not affected by the empty image
    assert r["dataset_P"] == 1 and r["dataset_R"] == 1 and r["fgIoU"] == 1
    # a false positive on a text-free image: P_i = 0/1, R_i = 0
    r = _run(([[1, 0]], [[0, 0]]))
    assert (r["P"], r["R"], r["fp"]) == (0, 0, 1)


def test_fully_ignored_image_counts_as_an_image_with_nothing():
    # every pixel ignored: no prediction counts, P_i = R_i = 0, and the image still enters the means
    r = _run(([[1, 1], [0, 1]], [[255, 255], [255, 255]]))
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (0, 0, 0, 0)
    assert r["P"] == 0 and r["R"] == 0 and r["images_fully_ignored"] == 1
    r = _run(([[1, 0]], [[1, 0]]), ([[1, 1]], [[255, 255]]))
    assert r["P"] == pytest.approx(0.5) and r["R"] == pytest.approx(0.5)


def test_mixed_set_by_hand():
    r = _run(([[1, 0, 1, 0]], [[1, 1, 0, 0]]),          # tp 1 fp 1 fn 1 tn 1: P 1/2 R 1/2
             ([[1, 1, 1, 1]], [[1, 1, 1, 255]]),        # tp 3, the 255 pixel counts nowhere: P 1 R 1
             ([[0, 0, 0, 0]], [[0, 0, 0, 0]]),          # no text: P 0 R 0, tn 4
             ([[1, 1, 0, 0]], [[255, 255, 255, 255]]))  # fully ignored: P 0 R 0
    assert r["P"] == pytest.approx(1.5 / 4) and r["R"] == pytest.approx(1.5 / 4)
    assert r["F"] == pytest.approx(1.5 / 4)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (4, 1, 1, 5)
    assert r["dataset_P"] == pytest.approx(0.8) and r["dataset_R"] == pytest.approx(0.8)
    assert r["dataset_F"] == pytest.approx(0.8)
    assert r["fgIoU"] == pytest.approx(4 / 6) and r["bgIoU"] == pytest.approx(5 / 7)
    assert r["mIoU"] == pytest.approx((4 / 6 + 5 / 7) / 2)
    assert (r["images_without_text"], r["images_fully_ignored"]) == (2, 1)
    table = format_table(r, "title")
    assert "mIoU" in table and "2 without text, 1 fully ignored" in table and "37.50" in table


def test_f_from_the_means_not_the_mean_of_f():
    r = _run(([[1, 0, 0, 0]], [[1, 1, 1, 1]]),   # P 1, R 1/4 (per-image F 0.4)
             ([[1, 1, 1, 1]], [[1, 0, 0, 0]]))   # P 1/4, R 1 (per-image F 0.4)
    assert r["F"] == pytest.approx(0.625)


def test_miou_leaves_out_a_class_with_an_empty_union():
    # no text anywhere and none predicted: the text class has union 0 (NaN in TexRNet, left out
    # of its nanmean), so mIoU is the background IoU alone
    r = _run(([[0, 0, 0]], [[0, 0, 255]]))
    assert r["mIoU"] == 1.0 and r["bgIoU"] == 1.0 and r["fgIoU"] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="no images"):
        TextSegMetrics().compute()
    with pytest.raises(ValueError, match=r"pred shape \(1, 1\) != target shape \(1, 2\)"):
        TextSegMetrics().update(torch.tensor([[1]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match=r"\(tp, fp, fn, tn\), got \(1, 2, 3\)"):
        TextSegMetrics().merge([(1, 2, 3)])


# ---- held-out: an independent transcription of TexRNet's evaluator ------------------------------

def texrnet_transcription(preds, gts, class_n=2, ignore=255):
    """Written from TexRNet's description, not from armnet.metrics: ignore becomes class `class_n`
    in both maps (a prediction on an ignore pixel is moved there too), a (class_n+1)² confusion
    matrix per image by bincount; intersection = diagonal, union = predicted + true - diagonal;
    pred_num / gt_num = label counts of the classes below class_n. F-score: per-image P = tp/pn
    (0 where pn = 0), R = tp/gn (0 where gn = 0), means over images, F from the means; mIoU:
    summed intersections over summed unions per class, nanmean."""
    k = class_n + 1
    inter, union, pn, gn = [], [], [], []
    for p, g in zip(preds, gts):
        g = np.where((g >= 0) & (g < class_n), g, class_n).astype(np.int64)
        p = np.where((g < class_n) & (p >= 0) & (p < class_n), p, class_n).astype(np.int64)
        cm = np.bincount((g * k + p).ravel(), minlength=k * k).reshape(k, k)
        tp = np.diag(cm)
        inter.append(tp[:class_n])
        union.append((cm.sum(0) + cm.sum(1) - tp)[:class_n])
        pn.append(np.bincount(p.ravel(), minlength=k)[:class_n])
        gn.append(np.bincount(g.ravel(), minlength=k)[:class_n])
    inter, union, pn, gn = map(np.array, (inter, union, pn, gn))
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pn > 0, inter / pn, 0.0).mean(0)
        recl = np.where(gn > 0, inter / gn, 0.0).mean(0)
        iou = inter.sum(0) / union.sum(0)
    fscore = 2 * prec * recl / (prec + recl)
    return {"P": prec[1], "R": recl[1], "F": fscore[1], "mIoU": np.nanmean(iou), "fgIoU": iou[1]}


def test_matches_an_independent_transcription_of_texrnet():
    rng = np.random.default_rng(2026)
    preds, gts = [], []
    for i in range(40):
        h, w = rng.integers(3, 9, 2)
        gt = (rng.random((h, w)) < rng.uniform(0, 0.6)).astype(np.int64)
        gt[rng.random((h, w)) < 0.15] = 255
        pred = (rng.random((h, w)) < rng.uniform(0, 0.6)).astype(np.int64)
        if i % 7 == 0:
            gt[gt == 1] = 0                 # no text
        if i % 9 == 0:
            pred[:] = 0                     # nothing predicted
        if i % 11 == 0:
            gt[:] = 255                     # fully ignored
        preds.append(pred)
        gts.append(gt)
    m = TextSegMetrics()
    for p, g in zip(preds, gts):
        m.update(torch.from_numpy(p), torch.from_numpy(g))
    ours = m.compute()
    ref = texrnet_transcription(preds, gts)
    assert ours["images_without_text"] >= 6 and ours["images_fully_ignored"] >= 4
    for key in ("P", "R", "F", "mIoU", "fgIoU"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key
