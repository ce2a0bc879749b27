"""The public ops and the ARM-Net model on device='meta' tensors (shapes only, no memory), as
used to build a model before materialising it. Autocast has no meta device: asking it about meta
tensors raised "unknown device type for autocast"."""
import pytest
import torch

import armnet_ops
from armnet import armnet_tiny

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
META = torch.device("meta")


def meta(*shape):
    return torch.empty(*shape, device=META)


def check(out, shape):
    assert out.device.type == "meta" and tuple(out.shape) == shape


def test_criss_cross_attention_on_meta():
    q, k, v = meta(2, 4, 5, 6), meta(2, 4, 5, 6), meta(2, 8, 5, 6)
    check(armnet_ops.criss_cross_attention(q, k, v), (2, 8, 5, 6))
    check(armnet_ops.criss_cross_attention(q, k, v, gamma=meta(1), residual=meta(2, 8, 5, 6)),
          (2, 8, 5, 6))


def test_cca_weight_and_map_on_meta():
    q, k, v = meta(2, 4, 5, 6), meta(2, 4, 5, 6), meta(2, 8, 5, 6)
    attn = armnet_ops.cca_weight(q, k)
    check(attn, (2, 5 + 6 - 1, 5, 6))
    check(armnet_ops.cca_map(attn, v), (2, 8, 5, 6))


def test_carafe_and_carafe_fused_on_meta():
    x = meta(1, 3, 4, 5)
    check(armnet_ops.carafe(x, meta(1, 9, 8, 10), 3, 1, 2), (1, 3, 8, 10))
    check(armnet_ops.carafe_fused(x, meta(1, 9 * 4, 4, 5), 3, 1, 2), (1, 3, 8, 10))


def test_directional_conv2d_on_meta():
    x, w = meta(1, 3, 7, 9), meta(5, 3, 1, 3)
    check(armnet_ops.directional_conv2d(x, w, meta(5), dilation=(1, 2), scale=meta(5),
                                        shift=meta(5), activation="relu"), (1, 5, 7, 9))


def test_ops_on_meta_under_an_active_cpu_autocast():
    """An autocast region of another device type leaves meta inputs alone."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check(armnet_ops.carafe_fused(meta(1, 3, 4, 5), meta(1, 36, 4, 5), 3, 1, 2),
              (1, 3, 8, 10))


def test_armnet_tiny_builds_and_runs_on_meta():
    with torch.device("meta"):
        model = armnet_tiny()
    assert all(p.device.type == "meta" for p in model.parameters())
    out = model(meta(2, 3, 60, 44))
    check(out["logits"], (2, 2, 60, 44))
    check(out["rem_map"], (2, 1, 8, 6))
    model.to_empty(device="cpu")   # then materialised on a real device
    assert all(p.device.type == "cpu" for p in model.parameters())
