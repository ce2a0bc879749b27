"""Checkpoints: one dict with the model's name and constructor arguments, so `eval` and
`predict` rebuild the right network from the file alone.

    {"format": "armnet-checkpoint", "version": 1, "model_name": "armnet_tiny",
     "model_kwargs": {...}, "model": state_dict, "optimizer": ..., "scaler": ...,
     "epoch": completed epochs, "iteration": optimizer steps, "args": {...}}
"""
from __future__ import annotations

import os

import torch

from .model import ARMNet, build_model

FORMAT = "armnet-checkpoint"


def save_checkpoint(path: str, model: ARMNet, model_name: str, model_kwargs: dict, **extra) -> None:
    tmp = path + ".tmp"
    torch.save({"format": FORMAT, "version": 1, "model_name": model_name,
                "model_kwargs": model_kwargs, "model": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def read_checkpoint(path: str) -> dict:
    """Loads and validates a checkpoint file; every failure is a clear error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: no such file {path!r}")
    try:
        # weights_only: a checkpoint holds tensors and plain Python values, never code to run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"--checkpoint: cannot read {path!r} as a torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RuntimeError(f"--checkpoint: {path!r} is not an ARM-Net checkpoint written by "
                           "`python -m armnet train` (no 'format': 'armnet-checkpoint' entry)")
    return ckpt


def load_model(path: str, model_name: str | None = None, ops_backend: str = "auto"):
    """Rebuilds the model stored in checkpoint `path`; (model, checkpoint dict).

    `model_name`, when given, must match the checkpoint's.
    """
    ckpt = read_checkpoint(path)
    if model_name is not None and model_name != ckpt["model_name"]:
        raise RuntimeError(f"--checkpoint: {path!r} holds a {ckpt['model_name']!r} model, "
                           f"but --model is {model_name!r}")
    kwargs = dict(ckpt.get("model_kwargs", {}))
    kwargs["ops_backend"] = ops_backend
    model = build_model(ckpt["model_name"], **kwargs)
    load_state(model, ckpt["model"], path)
    return model, ckpt


def load_state(model: torch.nn.Module, state: dict, path: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise RuntimeError(f"--checkpoint: the weights in {path!r} do not fit the model: "
                           + " ".join(first)) from e
