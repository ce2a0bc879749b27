"""armnet: the ARM-Net scene text segmentation model on top of armnet_ops.

    from armnet import armnet_r50, armnet_tiny
    model = armnet_tiny(ops_backend="auto")
    logits = model(images)["logits"]            # (N, 2, H, W)

Command line: `python -m armnet {train,eval,predict,synth} --help`.
"""
from .backbone import load_backbone_weights, resnet50_os8, resnet_tiny
from .model import ARMNet, ARMNetLoss, armnet_r50, armnet_tiny, build_model

__all__ = ["ARMNet", "ARMNetLoss", "armnet_r50", "armnet_tiny", "build_model",
           "load_backbone_weights", "resnet50_os8", "resnet_tiny"]
