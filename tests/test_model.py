"""ARM-Net network: shapes, backward, ablations, backbone naming/weights, module semantics.

Everything runs on CPU at tiny resolutions; the ops run on whatever backend "auto" resolves to
(the reference when the extension is not built) and are compared with "reference".
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import armnet_ops
from armnet import ARMNetLoss, armnet_r50, armnet_tiny, load_backbone_weights
from armnet.backbone import Bottleneck, ResNet, resnet50_os8, resnet_tiny
from armnet.model import (ChannelSemanticAwareModule, DenseTextModule, RecognitionEnhancedModule,
                          build_model, depthwise_taps)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ctor,size", [
    (armnet_tiny, (2, 40, 48)),
    pytest.param(armnet_r50, (1, 64, 48), marks=pytest.mark.slow)])
def test_forward_shapes_and_backward(ctor, size):
    n, h, w = size
    model = ctor()
    x = torch.randn(n, 3, h, w, requires_grad=True)
    target = torch.rand(n, 1, h, w)
    out = model(x, target)
    assert out["logits"].shape == (n, 2, h, w)
    assert out["rem_map"].shape == (n, 1, math.ceil(h / 8), math.ceil(w / 8))
    assert ((out["rem_map"] >= 0) & (out["rem_map"] <= 1)).all()
    mask = torch.randint(0, 2, (n, h, w))
    loss, parts = ARMNetLoss()(out, mask, target)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert set(parts) == {"ce", "rem_l1"}


def test_odd_input_size_is_padded_and_cropped():
    model = armnet_tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 37, 29))
    assert out["logits"].shape == (1, 2, 37, 29)


@pytest.mark.parametrize("switch", ["use_tsm", "use_gtm", "use_dtm", "use_dpd", "use_rem"])
def test_ablation_switches(switch):
    full = armnet_tiny()
    model = armnet_tiny(**{switch: False})
    names = {n.split(".")[0] + "." + n.split(".")[1] if "." in n else n
             for n, _ in model.named_parameters()}
    if switch == "use_tsm":
        assert not any(isinstance(m, (armnet_ops.nn.CrissCrossAttention, DenseTextModule))
                       for m in model.modules())
    if switch == "use_gtm":
        assert not any(isinstance(m, armnet_ops.nn.CrissCrossAttention) for m in model.modules())
        assert any(isinstance(m, DenseTextModule) for m in model.modules())
    if switch == "use_dtm":
        assert not any(isinstance(m, DenseTextModule) for m in model.modules())
        assert any(isinstance(m, armnet_ops.nn.CrissCrossAttention) for m in model.modules())
    if switch == "use_dpd":
        assert model.decoder is None
        assert not any(isinstance(m, armnet_ops.nn.CARAFEPack) for m in model.modules())
    if switch == "use_rem":
        assert model.rem is None
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert names
    x = torch.randn(2, 3, 32, 40)
    out = model(x, torch.rand(2, 1, 32, 40))
    assert out["logits"].shape == (2, 2, 32, 40)
    assert (out["rem_map"] is None) == (switch == "use_rem")
    loss, parts = ARMNetLoss()(out, torch.randint(0, 2, (2, 32, 40)), torch.rand(2, 1, 32, 40))
    loss.backward()
    assert ("rem_l1" in parts) == (switch != "use_rem")


def test_all_off_is_fcn_baseline():
    model = armnet_tiny(use_tsm=False, use_dpd=False, use_rem=False)
    assert not any(isinstance(m, (armnet_ops.nn.CrissCrossAttention, armnet_ops.nn.CARAFEPack,
                                  armnet_ops.nn.DirectionalConv2d)) for m in model.modules())
    assert model(torch.randn(1, 3, 24, 24))["logits"].shape == (1, 2, 24, 24)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ops_backend_reaches_every_op_module(backend):
    model = armnet_tiny(ops_backend=backend)
    ops = [m for m in model.modules() if isinstance(m, (armnet_ops.nn.CrissCrossAttention,
                                                        armnet_ops.nn.CARAFEPack,
                                                        armnet_ops.nn.DirectionalConv2d))]
    assert len(ops) == 1 + 3 + 8  # one CCA (shared over R = 2), 3 DPD stages, 4 rates × 2 dirs
    assert {m.backend for m in ops} == {backend}


def test_auto_matches_reference_backend():
    torch.manual_seed(1)
    auto = armnet_tiny(ops_backend="auto").eval()
    # make gamma and the zero-initialised branches non-trivial so every op matters
    with torch.no_grad():
        for name, p in auto.named_parameters():
            if name.endswith("gamma") or "channel.generate" in name:
                p.normal_(0, 0.5)
    ref = armnet_tiny(ops_backend="reference").eval()
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        a, r = auto(x), ref(x)
    torch.testing.assert_close(a["logits"], r["logits"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(a["rem_map"], r["rem_map"], rtol=1e-3, atol=1e-3)


# ---- backbone --------------------------------------------------------------------------------------

def test_backbone_torchvision_names_and_dilation():
    net = resnet50_os8()
    keys = set(net.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.running_var", "layer2.3.conv3.weight", "layer3.5.bn2.weight",
              "layer4.2.conv3.weight", "layer4.0.downsample.1.num_batches_tracked"):
        assert k in keys, k
    assert not any(k.startswith("fc.") for k in keys)
    # 3-4-6-3 bottlenecks, 53 convolutions (incl. 4 downsample) and 53 BNs as torchvision's resnet50
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 53
    # replace_stride_with_dilation=[False, True, True]: first dilated block keeps the old dilation
    assert net.layer2[0].conv2.stride == (2, 2)
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[0].conv2.dilation == (1, 1)
    assert net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[1].conv2.dilation == (4, 4)
    assert net.layer4[0].downsample[0].stride == (1, 1)
    feats = net(torch.randn(1, 3, 64, 96))
    assert feats["layer4"].shape == (1, 2048, 8, 12)
    assert feats["layer1"].shape == (1, 256, 16, 24) and feats["stem"].shape == (1, 64, 32, 48)
    tiny = resnet_tiny()(torch.randn(1, 3, 64, 64))
    assert tiny["layer4"].shape[-2:] == (8, 8)


def test_backbone_weights_load_torchvision_format(tmp_path):
    src = ResNet(Bottleneck, (3, 4, 6, 3), num_classes=1000)  # with an fc, as torchvision saves
    for p in src.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    model = armnet_r50()
    load_backbone_weights(model.backbone, path)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], msg=k)

    bad = dict(src.state_dict())
    bad["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(RuntimeError, match="layer1.0.conv1.weight"):
        load_backbone_weights(model.backbone, tmp_path / "bad_shape.pth")
    del bad["layer1.0.conv1.weight"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="missing"):
        load_backbone_weights(model.backbone, tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone_weights(model.backbone, tmp_path / "nope.pth")


# ---- module semantics ---------------------------------------------------------------------------

def test_dtm_is_cascade_of_horizontal_and_vertical_dilations():
    dtm = DenseTextModule(8, 4, rates=(1, 2, 3, 6))
    assert [m.dilation for m in dtm.horizontal] == [(1, 1), (1, 2), (1, 3), (1, 6)]
    assert [m.dilation for m in dtm.vertical] == [(1, 1), (2, 1), (3, 1), (6, 1)]
    dtm.eval()
    x = torch.randn(1, 8, 12, 12)
    outs = dtm(x)
    assert len(outs) == 4 and all(o.shape == (1, 4, 12, 12) for o in outs)
    # the cascade: stage 2 reads stage 1's output, not x
    expect = dtm.horizontal[1](outs[0]) + dtm.vertical[1](outs[0])
    torch.testing.assert_close(outs[1], expect)


@pytest.mark.parametrize("gain", [False, True])
def test_channel_branch_matches_explicit_per_sample_depthwise_conv(gain):
    torch.manual_seed(0)
    mod = ChannelSemanticAwareModule(6, kernel_size=3, channel_gain=gain)
    torch.nn.init.normal_(mod.generate.weight)
    f, f_s = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 10, 14)
    got = mod(f, f_s)
    for n in range(2):
        flat = f[n].reshape(6, -1)
        w_c = torch.softmax(flat @ flat.T / flat.shape[1], dim=-1)
        logits = F.adaptive_avg_pool2d(mod.generate((w_c @ flat).reshape(1, 6, 5, 7)), 3)[0]
        logits = logits.reshape(6, 9)
        kern = torch.softmax(logits, -1)
        if gain:
            kern = kern * 2 / (1 + torch.exp(-logits.mean(1, keepdim=True)))  # 2·sigmoid(level)
        kern = kern.reshape(6, 3, 3)
        expect = F.conv2d(f_s[n:n + 1], kern[:, None], padding=1, groups=6)
        torch.testing.assert_close(got[n:n + 1], expect, rtol=1e-5, atol=1e-5)
    zero = ChannelSemanticAwareModule(6, channel_gain=gain)  # g starts at zero: a 3×3 mean
    box = F.avg_pool2d(f_s, 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(zero(f, f_s), box, rtol=1e-5, atol=1e-5)
    # normalised kernels (times a gain in (0, 2)) keep the output within (twice) the input's
    # range, whatever g does (stable in eval mode)
    torch.nn.init.normal_(mod.generate.weight, std=100.0)
    assert mod(f * 50, f_s).abs().max() <= (2 if gain else 1) * f_s.abs().max() + 1e-5


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (6, 9)])
def test_depthwise_taps_matches_grouped_conv_with_and_without_autograd(k, hw):
    """Both forms of depthwise_taps (out of place under autograd, in place without it) against
    F.conv2d with groups = C for each sample; images smaller than the kernel included."""
    torch.manual_seed(0)
    x, kern = torch.randn(2, 4, *hw), torch.randn(2, 4, k, k)
    expect = torch.cat([F.conv2d(x[n:n + 1], kern[n][:, None], padding=k // 2, groups=4)
                        for n in range(2)])
    with torch.no_grad():
        lean = depthwise_taps(x, kern)
    x.requires_grad_(True)
    taped = depthwise_taps(x, kern)
    assert taped.requires_grad
    torch.testing.assert_close(taped.detach(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean, taped.detach(), rtol=1e-6, atol=1e-6)  # float rounding only
    with torch.inference_mode():
        torch.testing.assert_close(depthwise_taps(x.detach(), kern), lean, rtol=0, atol=0)


def test_channel_branch_keeps_a_per_channel_gain():
    """Paper §3.3: the channel branch emphasises some channels and suppresses others. A softmax
    kernel alone sums to 1 for every channel; with channel_gain the level of the pooled logits
    sets a gain."""
    mod = ChannelSemanticAwareModule(2, kernel_size=3, channel_gain=True)
    with torch.no_grad():
        mod.generate.bias.copy_(torch.tensor([3.0, -3.0]))   # channel 0 up, channel 1 down
    f, f_s = torch.randn(1, 2, 4, 4), torch.ones(1, 2, 6, 6)
    centre = mod.eval()(f, f_s)[0, :, 3, 3]                  # an interior pixel: the kernel's sum
    sig = 1 / (1 + math.exp(-3.0))
    torch.testing.assert_close(centre, torch.tensor([2 * sig, 2 * (1 - sig)]))
    assert centre[0] > 1.9 and centre[1] < 0.1
    mod.channel_gain = False                                    # the default: no gain
    torch.testing.assert_close(mod(f, f_s)[0, :, 3, 3], torch.ones(2))
    gains = [m.channel.channel_gain for m in armnet_tiny(dpd_channel_gain=True).decoder]
    assert gains == [True] * 3 and not armnet_tiny().decoder[0].channel.channel_gain


def test_rem_attention_matches_equation_6():
    torch.manual_seed(0)
    rem = RecognitionEnhancedModule(8, embed=4, unet_width=4).eval()
    rem.gamma.data.fill_(0.7)
    f = torch.randn(2, 8, 5, 6)
    out, attn_map = rem(f)
    q = rem.query(attn_map).flatten(2).transpose(1, 2)     # F_Q (N, HW, d)
    k = rem.key(f).flatten(2).transpose(1, 2)               # F_K
    v = f.flatten(2).transpose(1, 2)                        # F_V
    t_e = torch.softmax(k @ q.transpose(1, 2) / 2.0, -1) @ v
    expect = f + 0.7 * t_e.transpose(1, 2).reshape(2, 8, 5, 6)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_rem_teacher_forcing_uses_target_in_training_only():
    rem = RecognitionEnhancedModule(8, embed=4, unet_width=4, teacher_forcing=True)
    rem.gamma.data.fill_(1.0)
    f = torch.randn(2, 8, 8, 8)
    zeros, ones = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    ones[:, :, :4] = 0  # a map that varies over positions changes the attention
    assert not torch.allclose(rem(f, zeros)[0], rem(f, ones)[0])
    rem.eval()
    torch.testing.assert_close(rem(f, zeros)[0], rem(f, ones)[0])


def test_loss_ignore_index_and_rem_term():
    logits = torch.randn(2, 2, 4, 4)
    mask = torch.randint(0, 2, (2, 4, 4))
    mask[0, 0] = 255
    rem_map, target = torch.rand(2, 1, 2, 2), torch.rand(2, 1, 4, 4)
    loss, parts = ARMNetLoss(rem_weight=0.5)({"logits": logits, "rem_map": rem_map}, mask, target)
    keep = mask != 255
    logp = torch.log_softmax(logits, 1)
    ce = -logp.permute(0, 2, 3, 1)[keep].gather(1, mask[keep][:, None]).mean()
    l1 = (rem_map - F.avg_pool2d(target, 2)).abs().mean()
    torch.testing.assert_close(loss, ce + 0.5 * l1)
    all_ignored = torch.full((2, 4, 4), 255)
    loss, _ = ARMNetLoss()({"logits": logits.requires_grad_(), "rem_map": None}, all_ignored)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()


def test_loss_text_weight_is_weighted_mean_over_valid_pixels():
    logits = torch.randn(2, 2, 5, 3)
    mask = torch.randint(0, 2, (2, 5, 3))
    mask[1, :2] = 255
    loss, parts = ARMNetLoss(rem_weight=0.0, text_weight=3.0)({"logits": logits, "rem_map": None}, mask)
    keep = mask != 255
    nll = -torch.log_softmax(logits, 1).permute(0, 2, 3, 1)[keep].gather(1, mask[keep][:, None])[:, 0]
    w = torch.where(mask[keep] == 1, 3.0, 1.0)
    torch.testing.assert_close(loss, (w * nll).sum() / w.sum())
    # weight 1 is the plain mean; a text-heavy weight raises the loss of missing text
    plain, _ = ARMNetLoss(text_weight=1.0)({"logits": logits, "rem_map": None}, mask)
    torch.testing.assert_close(plain, nll.mean())
    with pytest.raises(ValueError, match="text_weight"):
        ARMNetLoss(text_weight=0.0)


def test_loss_dice_term_is_per_image_soft_f():
    # every pixel has p(text) = 0.75; image 0 has one text pixel among three valid ones, image 1
    # has no text pixel: soft F_0 = (2·0.75 + 1) / (3·0.75 + 1 + 1), soft F_1 = 1 / (4·0.75 + 1)
    logits = torch.zeros(2, 2, 2, 2)
    logits[:, 1] = math.log(3.0)
    mask = torch.tensor([[[1, 0], [0, 255]], [[0, 0], [0, 0]]])
    ce, _ = ARMNetLoss(rem_weight=0.0)({"logits": logits, "rem_map": None}, mask)
    loss, parts = ARMNetLoss(rem_weight=0.0, dice_weight=2.0)({"logits": logits, "rem_map": None},
                                                              mask)
    f0, f1 = 2.5 / 4.25, 1 / 4.0
    expect = ((1 - f0) + (1 - f1)) / 2
    assert parts["dice"] == pytest.approx(expect)
    torch.testing.assert_close(loss, ce + 2.0 * expect)
    all_ignored = torch.full((2, 2, 2), 255)
    loss, parts = ARMNetLoss(dice_weight=1.0)({"logits": logits, "rem_map": None}, all_ignored)
    assert loss.item() == 0.0 and parts["dice"] == 0.0
    with pytest.raises(ValueError, match="dice_weight"):
        ARMNetLoss(dice_weight=-1.0)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="armnet_tiny"):
        build_model("armnet_r101")


def test_rem_target_is_pooled_onto_the_padded_grid():
    """A 100×100 input is padded to 104×104, so the 13×13 REM grid's last row and column hold 4
    image pixels and 4 padding pixels (no text). An all-text target is therefore 1 in the 12×12
    interior, 0.5 on the last row and column and 0.25 in the corner. Stretching 100 pixels over
    13 cells (adaptive pooling) would give 1 everywhere."""
    target = torch.ones(1, 1, 100, 100)
    expect = torch.ones(1, 1, 13, 13)
    expect[..., 12, :] = 0.5
    expect[..., :, 12] = 0.5
    expect[..., 12, 12] = 0.25
    logits, mask = torch.zeros(1, 2, 100, 100), torch.zeros(1, 100, 100, dtype=torch.long)
    loss = ARMNetLoss(rem_weight=1.0)
    _, parts = loss({"logits": logits, "rem_map": expect}, mask, target)
    assert parts["rem_l1"] == pytest.approx(0.0, abs=1e-7)
    # a target with text only in rows 96..99: in the last row of cells, half of each cell
    target = torch.zeros(1, 1, 100, 100)
    target[..., 96:, :] = 1.0
    expect = torch.zeros(1, 1, 13, 13)
    expect[..., 12, :12] = 0.5
    expect[..., 12, 12] = 0.25
    _, parts = loss({"logits": logits, "rem_map": expect}, mask, target)
    assert parts["rem_l1"] == pytest.approx(0.0, abs=1e-7)
    # the model's map has that grid for that input
    assert armnet_tiny()(torch.randn(1, 3, 100, 100))["rem_map"].shape[-2:] == (13, 13)


def test_rem_teacher_forcing_target_is_aligned_with_the_padded_input():
    """With teacher forcing, the full-resolution target reaches the REM pooled onto the same grid
    as the loss uses: text only in image rows 96..99 is 0.5 in the last row of cells."""
    model = armnet_tiny(rem_teacher_forcing=True).train()
    seen = {}
    model.rem.query.register_forward_pre_hook(lambda mod, args: seen.setdefault("q_map", args[0]))
    target = torch.zeros(1, 1, 100, 100)
    target[..., 96:, :] = 1.0
    model(torch.randn(1, 3, 100, 100), target)
    q_map = seen["q_map"]
    assert q_map.shape[-2:] == (13, 13)
    torch.testing.assert_close(q_map[0, 0, 12, :12], torch.full((12,), 0.5))
    assert q_map[0, 0, :12].abs().max() == 0


def test_chunked_attention_equals_one_pass():
    from armnet.model import chunked_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 37, 4), torch.randn(2, 29, 4), torch.randn(2, 29, 6)
    expect = torch.softmax(q @ k.transpose(1, 2) * 0.5, -1) @ v        # Eq. 6 written out
    for budget in (1, 29, 100, 29 * 37, 1 << 20):                      # 1..37 queries a chunk
        torch.testing.assert_close(chunked_attention(q, k, v, 0.5, budget), expect,
                                   rtol=1e-5, atol=1e-5)


def test_chunked_attention_chunk_size_bounds_the_weights(monkeypatch):
    """Every SDPA call sees at most max_elements weights per image (max(1, budget // keys)
    queries), so the largest temporary does not grow with the number of queries."""
    import armnet.model as model_module
    from armnet.model import chunked_attention
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.shape[-2] * k.shape[-2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    for n in (100, 400, 1600):
        seen.clear()
        chunked_attention(torch.randn(1, n, 4), torch.randn(1, n, 4), torch.randn(1, n, 3), 1.0,
                          max_elements=5000)
        assert max(seen) <= 5000 and sum(seen) == n * n
    seen.clear()
    chunked_attention(torch.randn(1, 3, 4), torch.randn(1, 9000, 4), torch.randn(1, 9000, 3), 1.0,
                      max_elements=5000)
    assert seen == [9000] * 3  # never fewer than one query a chunk


RSS_SCRIPT = r"""
import resource, sys, torch
from armnet.model import RecognitionEnhancedModule
torch.set_num_threads(1)
rem = RecognitionEnhancedModule(64, embed=16, unet_width=8).eval()   # armnet_tiny widths
rem.gamma.data.fill_(1.0)
f = torch.randn(1, 64, 128, 128)          # 16384 positions: a 1 GiB fp32 attention matrix
with torch.no_grad():
    rem(torch.randn(1, 64, 16, 16))       # warm up allocators and kernels at a small size
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, _ = rem(f)
    rem_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    # 1024 chunks of 16 queries: 1 MB of weights each, the output 4 MB in all
    from armnet.model import chunked_attention
    q, v = torch.randn(1, 16384, 16), torch.randn(1, 64, 16384).transpose(1, 2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunked_attention(q, q, v, 0.25, max_elements=1 << 18)
    many_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(rem_growth, many_growth)
"""


def test_rem_inference_memory_is_not_quadratic():
    """Eq. 6 on a 128×128 feature map (a 1024² image) in a fresh process: the one-pass attention
    held the 16384² matrix (1 GiB in fp32, 2.2 GB peak); chunked, the peak growth stays under
    256 MB (64 MB of weights a chunk, plus the U-Net's activations). Many small chunks must not
    grow the heap either: their outputs kept in a list fragmented it (+269 MB for 1024 chunks)."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rem_mb, many_mb = map(float, out.stdout.split()[-2:])
    assert rem_mb < 256, f"peak RSS grew by {rem_mb:.0f} MB"
    assert many_mb < 64, f"peak RSS grew by {many_mb:.0f} MB over 1024 chunks"


# The goal (SPEC §4, issue 15): one 2048² image evaluates on the CPU within 4 GB beyond the model.
# The activations grow with the pixel count, so a 512² image gets 1/16 of it: 250 MB. What does not
# shrink with the image (the REM's attention chunk of 2²⁴ weights, ~150 MB of the peak at 512²;
# library scratch) is held to the same 250 MB, so the bound is stricter than the goal, not looser.
# glibc keeps blocks under its mmap threshold (which grows to 32 MB) in the heap after they are
# freed, and RSS then counts the fragmentation, not the tensors alive; at 2048² every large tensor
# is over 32 MB and mapped on its own. A fixed 1 MB threshold makes a 512² pass allocate as a
# 2048² one does.
EVAL_MEMORY_BUDGET_MB = {"armnet_r50": 4000 / 16, "armnet_tiny": 4000 / 16}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["armnet_tiny", "armnet_r50"])
def test_eval_peak_memory_per_pixel_within_the_2048_goal(name):
    """Peak RSS beyond the model of evaluating one 512² image (benchmarks/eval_memory.py: fresh
    process, random weights, fp32, inference mode), against the 4 GB-at-2048² goal scaled to 512².
    armnet_r50 peaked at 478 MB here when the DPD's depthwise taps were summed out of place and
    every backbone feature lived until the logits, 218 MB after (armnet_tiny: 202 MB, 164 MB);
    at 2048² the same script gave 7.3 GB before and 3.1 GB after (armnet/README.md)."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_memory.py"),
                          "--model", name, "--size", "512", "512", "--threads", "2"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["beyond_mb"] < EVAL_MEMORY_BUDGET_MB[name], result
