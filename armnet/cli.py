"""Command line: `python -m armnet {train,eval,predict,export,check-data,synth,plot}`; see
`--help` of each.

`predict --onnx MODEL` runs on ONNX Runtime without torch (armnet/onnx_infer.py): main()
hands it over before anything imports torch.

The synthetic quality recipe (armnet_tiny on CPU) and its measured result are in
armnet/README.md, the one place that states them.
"""
from __future__ import annotations

import argparse
import sys


# Synthetic eval's default seed: not training's default (0), so that eval is held out by default.
EVAL_SYNTH_SEED = 12345


def _scales(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test scales: average the softmax over the image resized by each")
    p.add_argument("--protocol", default="scales", choices=["scales", "texrnet"],
                   help="texrnet: TexRNet's published test (8 sizes of area (int(512f)+1)^2, "
                        "f = 0.75..2.5, sides 32k+1, probabilities averaged, no flip)")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images whose longer side exceeds this (0: never)")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--ops-backend", default="auto",
                   choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="armnet_ops backend for CCA, CARAFE and directional conv")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16/fp16 on GPU, off on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if data:
        p.add_argument("--dataset", default="synthetic",
                       choices=["synthetic", "textseg", "totaltext", "icdar13"])
        p.add_argument("--data-root", default=None, help="dataset folder (not for synthetic)")
        p.add_argument("--split", default=None, help="train/val/test (default: train for "
                       "`train`, test for `eval`)")
        p.add_argument("--synth-n", type=int, default=1000, help="synthetic: number of images")
        p.add_argument("--synth-seed", type=int, default=0, help="synthetic: generator seed")
        p.add_argument("--synth-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")


def parser() -> argparse.ArgumentParser:
    from .model import MODELS
    ap = argparse.ArgumentParser(prog="python -m armnet", description="ARM-Net scene text segmentation")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (torchrun for several processes)")
    _common(t)
    t.add_argument("--model", default="armnet_r50", choices=sorted(MODELS))
    t.add_argument("--out", default="runs/armnet", help="checkpoint folder (last.pt, train_log.json)")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8, help="per process")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-epochs", type=int, default=5)
    t.add_argument("--power", type=float, default=0.9, help="poly decay power")
    t.add_argument("--rem-weight", type=float, default=1.0, help="weight of the REM l1 loss")
    t.add_argument("--text-weight", type=float, default=1.0,
                   help="cross-entropy weight of the text class (background 1)")
    t.add_argument("--dice-weight", type=float, default=0.0,
                   help="weight of the per-image soft-F (dice) loss on the text class")
    t.add_argument("--crop-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    t.add_argument("--small-crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="progressive resizing: train on crops of this size first, then on --crop-size")
    t.add_argument("--small-crop-until", type=float, default=0.6,
                   help="the fraction of the run (epochs, or the --time-limit budget) on --small-crop")
    t.add_argument("--scale-min", type=float, default=0.5)
    t.add_argument("--scale-max", type=float, default=2.0)
    t.add_argument("--flip", type=float, default=0.5,
                   help="probability of a horizontal flip (mirrored glyphs are not text a test "
                        "set holds; the synthetic recipe uses 0)")
    t.add_argument("--cache", action="store_true", help="synthetic: keep rendered images in memory")
    t.add_argument("--backbone-weights", default=None,
                   help="torchvision-format ResNet state dict (e.g. resnet50 ImageNet weights)")
    t.add_argument("--resume", default=None, help="checkpoint file, or 'auto' for <out>/last.pt")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    t.add_argument("--time-limit", type=float, default=0,
                   help="stop (and checkpoint) after this many seconds of training (0: no limit)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="validate every N steps and after the last (0: never); keeps best.pt by F")
    t.add_argument("--val-split", default="val", help="validation split (real datasets)")
    t.add_argument("--val-synth-seed", type=int, default=None,
                   help="synthetic validation seed (default: --synth-seed + 1)")
    t.add_argument("--val-max-images", type=int, default=0,
                   help="validate on at most this many images (0: all; synthetic renders 100)")
    t.add_argument("--rem-teacher-forcing", action="store_true",
                   help="train the REM attention with the target map as Q (paper: the "
                        "recognizer's map)")
    t.add_argument("--dpd-channel-gain", action="store_true",
                   help="DPD channel branch: scale each channel's kernel by a gain in (0, 2) "
                        "(armnet/README.md, 'DPD channel gain')")
    for name in ("tsm", "gtm", "dtm", "dpd", "rem"):
        t.add_argument(f"--no-{name}", action="store_true", help=f"ablation: drop the {name.upper()}")

    e = sub.add_parser("eval", help="evaluate a checkpoint: P/R/F (TexRNet style), dataset P/R/F, fgIoU")
    _common(e)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--model", default=None, choices=sorted(MODELS), help="check the checkpoint's model")
    e.add_argument("--out-json", default=None, help="write the metrics here")
    e.add_argument("--batch-size", type=int, default=1, help="synthetic only (same-size images)")
    e.add_argument("--max-images", type=int, default=0)
    e.set_defaults(synth_seed=EVAL_SYNTH_SEED)
    _scales(e)

    p = sub.add_parser("predict", help="write <stem>_mask.png and <stem>_overlay.png per image")
    _common(p, data=False)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    model_file = p.add_mutually_exclusive_group(required=True)
    model_file.add_argument("--checkpoint")
    model_file.add_argument("--onnx", metavar="MODEL.onnx",
                            help="run an exported model on ONNX Runtime, without torch "
                                 "(options: IMAGE, --out, --max-side, --scales, --threads)")
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--out", required=True, help="output folder")
    _scales(p)

    x = sub.add_parser("export", help="export a checkpoint to ONNX or an AOTInductor package, "
                       "then reload it and check it against eager PyTorch")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--format", required=True, choices=["onnx", "aoti"])
    x.add_argument("--out", required=True, help="the .onnx file or the .pt2 package to write")
    x.add_argument("--dynamic", action="store_true",
                   help="any batch size, height and width (default: fixed at --size, batch 1)")
    x.add_argument("--fp16", action="store_true", help="float16 weights and input")
    x.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="the example input's size (the only size without --dynamic)")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18; default: the exporter's)")

    c = sub.add_parser("check-data",
                       help="validate a dataset tree: counts per split, every problem found")
    c.add_argument("--dataset", required=True, choices=["textseg", "totaltext", "icdar13"])
    c.add_argument("--data-root", required=True, help="dataset folder")
    c.add_argument("--quick", action="store_true",
                   help="only the file headers (what a dataset checks when it is built), "
                        "not a full read of every sample")

    s = sub.add_parser("synth", help="write a synthetic set to disk in the TextSeg layout")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    s.add_argument("--split", default="test")

    g = sub.add_parser("plot", help="draw loss, learning rate and validation F of a training run")
    g.add_argument("run", help="the training --out folder (or its train_log.json)")
    g.add_argument("--out", default=None, help="PNG path (default: <run>/curves.png)")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"] and any(a == "--onnx" or a.startswith("--onnx=") for a in argv):
        from .onnx_infer import main as predict_onnx  # no torch on this path
        return predict_onnx(argv[1:])
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import train
            args.split = args.split or "train"
            train(args)
        elif args.command == "eval":
            from .evaluate import evaluate
            args.split = args.split or "test"
            evaluate(args)
        elif args.command == "predict":
            from .evaluate import predict
            predict(args)
        elif args.command == "export":
            from .export import export
            export(args)
        elif args.command == "check-data":
            from .data import check_data
            return 0 if check_data(args.dataset, args.data_root, deep=not args.quick) else 1
        elif args.command == "synth":
            from .data import write_synthetic
            write_synthetic(args.out, args.n, args.seed, tuple(args.size), args.split)
            print(f"wrote {args.n} images to {args.out}")
        elif args.command == "plot":
            from .plot import plot_log
            try:
                print(f"wrote {plot_log(args.run, args.out)}")
            except ImportError as e:
                raise RuntimeError(str(e)) from e
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"armnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
