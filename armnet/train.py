"""`python -m armnet train`: Adam, warm-up + poly learning rate, AMP, DDP, checkpoint/resume.

Schedule (per optimizer step, paper §4.1): linear warm-up from lr/100 to lr over the first
`warmup_epochs` epochs (capped at half of the run, so short runs still decay), then
lr · (1 − t)^power with t going from 0 to 1 over the remaining steps. With `--time-limit` the
decay also follows the clock: t is the larger of the step fraction and the fraction of the time
budget used, so a run that the budget cuts short still anneals to lr 0 instead of stopping at a
high learning rate (the CPU recipe relies on this; its step count depends on the machine).

Multi-process: launch with `torchrun --nproc_per_node=K -m armnet train ...`; each rank trains on
its DistributedSampler shard (gloo on CPU, NCCL on CUDA with one GPU per local rank); rank 0
writes checkpoints and shows the progress bar. `--batch-size` is per process.

Progressive resizing (`--small-crop H W`, `--small-crop-until F`): the first fraction F of the run
(by epochs, or by the time budget when `--time-limit` is set, whichever is further along) trains on
smaller random crops, the rest on `--crop-size`. Small crops make a step cheaper, so the network
gets more updates early; the last part at full size fits it to the context and the statistics of
larger images. For the synthetic CPU recipe it did not pay off over 20 minutes (armnet/README.md).

Validation (`--val-every N`): every N optimizer steps, and after the last step, rank 0 writes the
model to `<out>/val.pt` and scores it with `armnet.evaluate.evaluate` (the `eval` command's own
code, with its defaults) on `--val-split` of the training dataset (synthetic: `--val-max-images`
images, default 100, rendered with `--val-synth-seed`, default --synth-seed + 1; keep `eval`'s
held-out seed apart from both). The scores go into `train_log.json` ("val") and the checkpoint with
the highest F is kept as `<out>/best.pt`. Steps rather than epochs, so that short runs, time-limited
runs and one-epoch runs on large sets can all validate; the time spent validating counts towards
`--time-limit`. Other ranks wait at a barrier meanwhile.

Curves: at the end (and at each validation) `train_log.json` is written; `<out>/curves.png` (loss,
learning rate, validation F; `python -m armnet plot <out>` draws it again) is written at the end
when matplotlib is installed.

Checkpoints: `<out>/last.pt` after every epoch (and when `--max-steps` or `--time-limit` seconds
stop a run early);
`--resume <file>` or `--resume auto` (= `<out>/last.pt` if it exists) restores model, optimizer,
AMP scaler, epoch and step, and training continues with the same schedule.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from .backbone import load_backbone_weights
from .checkpoint import load_state, read_checkpoint, save_checkpoint
from .data import TrainAugment, build_dataset, collate
from .model import ARMNetLoss, build_model


def lr_at(step: int, total: int, warmup: int, base_lr: float, power: float = 0.9,
          time_fraction: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (0.01 + 0.99 * step / warmup)
    t = max((step - warmup) / max(total - warmup, 1), time_fraction)
    return base_lr * max(1.0 - t, 0.0) ** power


def crop_for(progress: float, crop_size: tuple, small_crop: tuple | None, until: float) -> tuple:
    """The crop size for an epoch that starts at `progress` (0..1) through the run."""
    return tuple(small_crop) if small_crop and progress < until else tuple(crop_size)


def make_loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool,
                pin_memory: bool) -> DataLoader:
    # Not persistent: worker processes are started afresh each epoch, so that they see the
    # dataset's epoch (set_epoch, which seeds the augmentation) and the epoch's crop size. The
    # persistent workers kept the copy they were started with, and so repeated epoch 0's crops.
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=False)


def elapsed_seconds(t0: float, world: int, device: torch.device) -> float:
    """Seconds since t0; the maximum over the ranks when distributed, so that every rank makes the
    same time-limit decision (one rank stopping alone would hang the others in all-reduce)."""
    elapsed = time.time() - t0
    if world > 1:
        t = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t)
    return elapsed


def setup_distributed(device_arg: str):
    """Returns (rank, world_size, local_rank, device); initialises the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def amp_dtype(arg: str, device: torch.device):
    """None (fp32) or the autocast dtype: "auto" = bf16 on GPUs that have it, else fp16; off on CPU."""
    if arg == "off" or (arg == "auto" and device.type != "cuda"):
        return None
    if arg == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[arg]


def model_kwargs_from_args(args) -> dict:
    kw = {"use_tsm": not args.no_tsm, "use_dpd": not args.no_dpd, "use_rem": not args.no_rem,
          "use_gtm": not args.no_gtm, "use_dtm": not args.no_dtm}
    if getattr(args, "rem_teacher_forcing", False):
        kw["rem_teacher_forcing"] = True
    if getattr(args, "dpd_channel_gain", False):
        kw["dpd_channel_gain"] = True
    return kw


# Seconds per training-crop pixel (crop area × batch) of one step on a CPU thread, from our 2-core
# machine: armnet_tiny 0.15 s for 4 × 96² (armnet/README.md), armnet_r50 38–44 s for 8 × 512².
CPU_SECONDS_PER_PIXEL = {"armnet_tiny": 0.15 / (4 * 96 * 96), "armnet_r50": 41.0 / (8 * 512 * 512)}


def setup_notices(args, device: torch.device) -> list[str]:
    """What `train` tells a user before it starts: on a CPU, the model, crop and expected step
    time, and how to pick the small model; for armnet_r50 without ImageNet weights, a warning."""
    notes = []
    if device.type == "cpu":
        h, w = args.crop_size
        est = CPU_SECONDS_PER_PIXEL.get(args.model, 0.0) * h * w * args.batch_size
        notes.append(f"no GPU in use: training {args.model} on {h}x{w} crops, batch "
                     f"{args.batch_size}, on the CPU; expect roughly {est:.2g} s a step (measured "
                     f"on a 2-core machine). For a quick CPU run pick the small model: "
                     f"--model armnet_tiny --crop-size 96 96 --batch-size 4")
    if args.model == "armnet_r50" and not args.backbone_weights:
        notes.append("warning: armnet_r50 trains from random weights without --backbone-weights "
                     "FILE (a torchvision resnet50 ImageNet state dict); the paper's numbers "
                     "start from ImageNet weights")
    return notes


def validation_args(args, checkpoint: str):
    """The `eval` command's arguments (its parser, so its defaults) for validating `checkpoint`."""
    from .cli import parser  # the command line imports train lazily; no import cycle
    argv = ["eval", "--checkpoint", checkpoint, "--dataset", args.dataset, "--device",
            args.device, "--ops-backend", args.ops_backend, "--amp", args.amp, "--quiet",
            "--max-images", str(args.val_max_images)]
    if args.dataset == "synthetic":
        seed = args.synth_seed + 1 if args.val_synth_seed is None else args.val_synth_seed
        argv += ["--synth-n", str(args.val_max_images or 100), "--synth-seed", str(seed),
                 "--synth-size", *map(str, args.synth_size)]
    else:
        argv += ["--data-root", args.data_root, "--split", args.val_split]
    return parser().parse_args(argv)


def write_log(out: str, summary: dict, args, history: list, val: list) -> None:
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"summary": summary, "args": vars(args), "history": history, "val": val}, f)


def train(args) -> dict:
    rank, world, _, device = setup_distributed(args.device)
    torch.manual_seed(args.seed + rank)
    main = rank == 0
    os.makedirs(args.out, exist_ok=True)
    val_every = getattr(args, "val_every", 0)
    if val_every < 0:
        raise ValueError(f"--val-every must be >= 0 (0: no validation), got {val_every}")
    if main:
        for note in setup_notices(args, device):
            print(f"armnet train: {note}", file=sys.stderr, flush=True)

    # checked before the dataset is built: rendering a synthetic set takes seconds
    small_crop = getattr(args, "small_crop", None)
    small_until = getattr(args, "small_crop_until", 0.6)
    if small_crop is not None:
        if min(small_crop) <= 0:
            raise ValueError(f"--small-crop must be two sizes > 0, got {tuple(small_crop)}")
        if not 0.0 <= small_until <= 1.0:
            raise ValueError(f"--small-crop-until must be in [0, 1], got {small_until}")
    augment = TrainAugment(tuple(args.crop_size), (args.scale_min, args.scale_max),
                           getattr(args, "flip", 0.5))
    dataset = build_dataset(args.dataset, args.data_root, args.split, augment=augment,
                            synth_n=args.synth_n, synth_seed=args.synth_seed,
                            synth_size=tuple(args.synth_size), cache=args.cache, aug_seed=args.seed)
    if len(dataset) == 0:
        raise RuntimeError(f"the {args.dataset} {args.split!r} split has no images")
    if val_every and args.dataset != "synthetic" and main:  # fail now, not at the first validation
        if len(build_dataset(args.dataset, args.data_root, args.val_split)) == 0:
            raise RuntimeError(f"--val-split: the {args.dataset} {args.val_split!r} split has no "
                               f"images")
    sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
               if world > 1 else RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)))
    loader = make_loader(dataset, args.batch_size, sampler, args.workers,
                         drop_last=len(dataset) // world >= args.batch_size,
                         pin_memory=device.type == "cuda")

    kwargs = model_kwargs_from_args(args)
    model = build_model(args.model, ops_backend=args.ops_backend, **kwargs)
    if args.backbone_weights:
        load_backbone_weights(model.backbone, args.backbone_weights)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    # fused: one kernel over all parameters instead of a Python loop of ~10 ops per tensor
    # (5.4 -> 1.0 ms a step for armnet_tiny on one CPU thread).
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = ARMNetLoss(args.rem_weight, text_weight=getattr(args, "text_weight", 1.0),
                            dice_weight=getattr(args, "dice_weight", 0.0))

    steps_per_epoch = len(loader)
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_epochs * steps_per_epoch, total // 2)
    start_epoch, step = 0, 0
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(args.out, "last.pt")
        resume = resume if os.path.exists(resume) else None
    if resume:
        ckpt = read_checkpoint(resume)
        if ckpt["model_name"] != args.model:
            raise RuntimeError(f"--resume: {resume!r} holds a {ckpt['model_name']!r} model, "
                               f"but --model is {args.model!r}")
        load_state(model, ckpt["model"], resume)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt.get("epoch", 0), ckpt.get("iteration", 0)
        if main:
            print(f"resumed from {resume}: epoch {start_epoch}, step {step}")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch_done: int):
        if main:
            save_checkpoint(os.path.join(args.out, "last.pt"), model, args.model, kwargs,
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            epoch=epoch_done, iteration=step, args=vars(args))

    val, best = [], {"F": -1.0, "step": None, "checkpoint": None}
    log_path = os.path.join(args.out, "train_log.json")
    if resume and val_every and os.path.exists(log_path):  # best.pt stays the best of the whole run
        with open(log_path) as f:
            previous = json.load(f)
        val = previous.get("val", [])
        best.update(previous.get("summary", {}).get("best") or {})

    def validate(epoch: int):
        """Scores the model as it is now (rank 0); keeps it as best.pt when its F is the best."""
        if main:
            path = os.path.join(args.out, "val.pt")
            save_checkpoint(path, model, args.model, kwargs, epoch=epoch, iteration=step,
                            args=vars(args))
            from .evaluate import evaluate
            quiet = io.StringIO() if args.quiet else None
            with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
                report = evaluate(validation_args(args, path))
            scores = {k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
            val.append({"step": step, "epoch": epoch, **scores})
            if scores["F"] > best["F"]:
                os.replace(path, os.path.join(args.out, "best.pt"))
                best.update(F=scores["F"], step=step, checkpoint=os.path.join(args.out, "best.pt"))
            else:
                os.remove(path)
            if not args.quiet:
                print(f"step {step}: validation F {scores['F']:.4f} (best {best['F']:.4f} at step "
                      f"{best['step']})", flush=True)
            write_log(args.out, {"steps": step, "best": best}, args, history, val)
        if world > 1:
            dist.barrier()

    history, t0 = [], time.time()
    stop = False
    time_limit = getattr(args, "time_limit", 0)
    used = 0.0  # the fraction of the time budget spent so far
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        model.train()
        augment.crop_size = crop_for(max(epoch / args.epochs, used), args.crop_size, small_crop,
                                     small_until)
        dataset.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main or args.quiet,
                   dynamic_ncols=True, leave=False)
        run_loss, n = 0.0, 0
        for batch in bar:
            lr = lr_at(step, total, warmup, args.lr, args.power, used)
            for g in optimizer.param_groups:
                g["lr"] = lr
            image = batch["image"].to(device, non_blocking=True)
            if args.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            mask = batch["mask"].to(device, non_blocking=True)
            rem_target = batch["rem_target"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(image, rem_target)
            loss, parts = criterion(out, mask, rem_target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            run_loss += loss.item()
            n += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            history.append({"step": step, "loss": loss.item(), "lr": lr, **parts})
            if step == 1 and main and device.type == "cpu" and not args.quiet:
                print(f"first step took {time.time() - t0:.2f} s on the CPU", flush=True)
            if val_every and step % val_every == 0:
                validate(epoch)
            if args.max_steps and step >= args.max_steps:
                stop = True
                break
            if time_limit:  # a wall-clock budget (the CPU recipe's 20 minutes)
                used = elapsed_seconds(t0, world, device) / time_limit
                if used >= 1.0:
                    stop = True
                    break
        bar.close()
        if main and not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}: mean loss {run_loss / max(n, 1):.4f}, "
                  f"lr {lr:.2e}, crop {augment.crop_size[0]}x{augment.crop_size[1]}, "
                  f"{time.time() - t0:.0f} s", flush=True)
        # an epoch cut short by --max-steps is redone from its start on resume
        checkpoint(epoch + 1 if n == steps_per_epoch else epoch)
        if stop:
            break
    if val_every and step and step % val_every:  # the same decision on every rank
        validate(epoch)  # the final model is always scored
    elapsed = time.time() - t0
    summary = {"steps": step, "seconds": elapsed, "world_size": world,
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None,
               "checkpoint": os.path.join(args.out, "last.pt")}
    if val_every:
        summary["best"] = best
    if main:
        write_log(args.out, summary, args, history, val)
        print(f"trained {step} steps in {elapsed:.0f} s; checkpoint {summary['checkpoint']}")
        from .plot import plot_log
        try:
            print(f"curves: {plot_log(args.out)}")
        except ImportError:
            pass  # matplotlib is optional; `python -m armnet plot` says how to get it
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary

