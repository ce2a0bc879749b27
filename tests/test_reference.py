"""The references are the oracles of every kernel, so they are pinned here independently: by
per-pixel loops written straight from SPEC §3 on tiny shapes, not by other vectorised code."""
import pytest
import torch
import torch.nn.functional as F

from armnet_ops import reference as R


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _criss_cross_keys(h, w, H, W):
    """SPEC §3.1: the row (W keys, u included), then the column without u (H-1 keys)."""
    return [(h, z) for z in range(W)] + [(j, w) for j in range(H) if j != h]


@pytest.mark.parametrize("N,C,Cv,H,W,scale", [(2, 3, 4, 4, 5, 0.7), (1, 2, 3, 1, 4, 1.0),
                                             (1, 2, 2, 5, 1, -0.5), (1, 1, 1, 1, 1, 2.0)])
def test_criss_cross_reference_against_loops(N, C, Cv, H, W, scale):
    q, k, v = _rand(N, C, H, W), _rand(N, C, H, W), _rand(N, Cv, H, W)
    out = torch.zeros(N, Cv, H, W, dtype=torch.float64)
    energy = torch.zeros(N, H + W - 1, H, W, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for w in range(W):
                keys = _criss_cross_keys(h, w, H, W)
                e = torch.stack([q[n, :, h, w] @ k[n, :, a, b] for a, b in keys])
                energy[n, :, h, w] = e
                a = torch.softmax(scale * e, 0)
                out[n, :, h, w] = sum(a[i] * v[n, :, y, x] for i, (y, x) in enumerate(keys))
    torch.testing.assert_close(R.criss_cross_attention(q, k, v, scale), out)
    torch.testing.assert_close(R.cca_weight(q, k), energy)
    torch.testing.assert_close(R.cca_map(torch.softmax(scale * energy, 1), v), out)


def _carafe_loops(f, m, k, G, s):
    N, C, H, W = f.shape
    r = (k - 1) // 2
    out = torch.zeros(N, C, s * H, s * W, dtype=f.dtype)
    for n in range(N):
        for c in range(C):
            g = c // (C // G)
            for y in range(s * H):
                for x in range(s * W):
                    acc = 0.0
                    for ky in range(k):
                        for kx in range(k):
                            yy, xx = y // s + ky - r, x // s + kx - r
                            if 0 <= yy < H and 0 <= xx < W:
                                acc += f[n, c, yy, xx] * m[n, g * k * k + ky * k + kx, y, x]
                    out[n, c, y, x] = acc
    return out


@pytest.mark.parametrize("k,G,s,H,W", [(3, 2, 2, 3, 4), (5, 1, 3, 2, 3), (1, 2, 1, 3, 2),
                                       (3, 1, 4, 1, 2), (7, 1, 1, 2, 2)])
def test_carafe_reference_against_loops(k, G, s, H, W):
    f, m = _rand(2, 4, H, W), _rand(2, G * k * k, s * H, s * W)
    torch.testing.assert_close(R.carafe(f, m, k, G, s), _carafe_loops(f, m, k, G, s))


@pytest.mark.parametrize("k,G,s", [(3, 2, 2), (5, 1, 3), (1, 1, 2)])
def test_carafe_fused_reference_is_softmax_of_pixel_shuffle(k, G, s):
    f, logits = _rand(2, 4, 3, 5), _rand(2, G * k * k * s * s, 3, 5)
    # Written out per output pixel: logit channel of tap t of group g at child (i, j) of (h, w)
    # is (g·k² + t)·s² + i·s + j, by the definition of pixel_shuffle.
    N, _, H, W = logits.shape
    mask = torch.zeros(N, G * k * k, s * H, s * W, dtype=torch.float64)
    for g in range(G):
        for y in range(s * H):
            for x in range(s * W):
                chans = [(g * k * k + t) * s * s + (y % s) * s + (x % s) for t in range(k * k)]
                mask[:, g * k * k:(g + 1) * k * k, y, x] = torch.softmax(
                    logits[:, chans, y // s, x // s], dim=1)
    torch.testing.assert_close(R.carafe_mask(logits, k, G, s), mask)
    torch.testing.assert_close(R.carafe_fused(f, logits, k, G, s), _carafe_loops(f, mask, k, G, s))


@pytest.mark.parametrize("kh,kw,dh,dw", [(1, 3, 1, 2), (3, 1, 3, 1), (3, 3, 2, 2), (5, 3, 1, 3)])
def test_directional_conv_reference_against_loops(kh, kw, dh, dw):
    x, w, b = _rand(2, 3, 5, 6), _rand(4, 3, kh, kw), _rand(4)
    scale, shift = _rand(4), _rand(4)
    N, _, H, W = x.shape
    out = torch.zeros(N, 4, H, W, dtype=torch.float64)
    for y in range(H):
        for xx in range(W):
            for i in range(kh):
                for j in range(kw):
                    yy, xs = y + (i - (kh - 1) // 2) * dh, xx + (j - (kw - 1) // 2) * dw
                    if 0 <= yy < H and 0 <= xs < W:
                        out[:, :, y, xx] += x[:, :, yy, xs] @ w[:, :, i, j].T
    expected = torch.relu((out + b.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    got = R.directional_conv2d(x, w, b, (dh, dw), scale, shift, "relu")
    torch.testing.assert_close(got, expected)


def test_references_are_differentiable():
    q, k, v = (_rand(1, 2, 3, 4).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: R.criss_cross_attention(*a, 0.5), (q, k, v))
    f, logits = _rand(1, 2, 3, 3).requires_grad_(), _rand(1, 9 * 4, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: R.carafe_fused(a, b, 3, 1, 2), (f, logits))
    attn = _rand(1, 6, 3, 4).requires_grad_()
    assert torch.autograd.gradcheck(R.cca_map, (attn, v))
    assert torch.autograd.gradcheck(R.cca_weight, (q, k))


def _saved_storage_bytes(out: torch.Tensor) -> int:
    """Bytes of the distinct storages that autograd keeps alive for out's backward."""
    storages, seen, stack = {}, set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_"):
                t = getattr(fn, name)
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
        stack.extend(f for f, _ in fn.next_functions)
    return sum(storages.values())


def test_carafe_reference_memory_is_lean():
    """Autograd must keep views of the padded features and of the masks, not k² tap copies."""
    f = torch.randn(1, 16, 32, 32, requires_grad=True)
    m = torch.softmax(torch.randn(1, 25, 64, 64), 1).requires_grad_()
    out = R.carafe(f, m, 5, 1, 2)
    inputs_bytes = F.pad(f, (2, 2, 2, 2)).nbytes + m.nbytes
    assert _saved_storage_bytes(out) <= inputs_bytes, "the reference saves copies of the taps"
