"""Synthetic scene text: random words in real fonts on cluttered, textured backgrounds.

`render_sample(rng, size)` returns (image uint8 (H, W, 3), mask uint8 (H, W) with 1 = text,
char_boxes float (K, 4) as x0, y0, x1, y1). Everything comes from the numpy Generator passed in, so
a (seed, index) pair always gives the same image.

* Fonts: the TrueType files found under the usual font folders (DejaVu on most Linux systems),
  hairline faces left out, else Pillow's built-in FreeType font (`ImageFont.load_default(size=...)`,
  Pillow ≥ 10.1). Sizes are TEXT_SIZE times the image's shorter side.
* Backgrounds: a colour gradient, blotches, stripes or a checker texture, random lines, ellipses and
  polygons, per-pixel noise and blur.
* Text: 1-3 words of 2-8 characters (letters and digits), each character rendered on its own,
  placed along a straight baseline at a random angle (±45°) or along a circular arc (curved text),
  rotated to follow the path. The mask is the union of the characters' glyph pixels; the
  character boxes are the axis-aligned boxes of the placed glyphs.
* Distractors: glyph-like non-text symbols (stars, arrows, crosses, rings) in text-like colours
  that stay background in the mask, so the network must learn text, not "thin dark strokes".
"""
from __future__ import annotations

import glob
import math
import os
import string
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ALPHABET = string.ascii_letters + string.digits
# Font size as a fraction of the image's shorter side. It sets the stroke width, and with it what
# pixel F measures. At 0.10-0.28 of 128 px (the first version) strokes were 1-2 px wide and the
# ground truth dilated by one pixel scored F = 0.61 against itself (150 images of seed 12345,
# TexRNet-style means): F mostly measured sub-pixel boundary placement. At 0.20-0.40 strokes are
# about 2-5 px and the same one-pixel dilation scores 0.74, nearer to TextSeg or Total-Text
# strokes at their working resolution.
TEXT_SIZE = (0.20, 0.40)
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"),
             "/Library/Fonts", "C:/Windows/Fonts")


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """TrueType/OpenType fonts on this machine (sorted, so the list is reproducible); may be ()."""
    found = []
    for d in FONT_DIRS:
        found += glob.glob(os.path.join(d, "**", "*.ttf"), recursive=True)
        found += glob.glob(os.path.join(d, "**", "*.otf"), recursive=True)
    # Symbol/emoji fonts have no Latin glyphs; leave them out.
    # Hairline faces (ExtraLight, Thin) have sub-pixel strokes at these sizes: their thresholded
    # masks are broken dashes, label noise rather than text.
    bad = ("emoji", "symbol", "dingbat", "wingding", "math", "extralight", "thin")
    return tuple(sorted(f for f in set(found) if not any(b in f.lower() for b in bad)))


@lru_cache(maxsize=256)
def _font(path: str | None, size: int):
    if path is None:
        try:
            return ImageFont.load_default(size=size)
        except TypeError as e:  # Pillow < 10.1: only a fixed-size bitmap font
            raise RuntimeError("armnet.synth needs a TrueType font: install e.g. fonts-dejavu, "
                               "or Pillow >= 10.1 for its built-in scalable font") from e
    return ImageFont.truetype(path, size)


def _pick_font(rng, size):
    files = font_files()
    return _font(str(files[rng.integers(len(files))]) if files else None, size)


def _random_colour(rng, lo=0, hi=256):
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _background(rng, size):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w) + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(4)
    if kind == 1:    # blotches: low-frequency noise upsampled
        g = rng.uniform(-60, 60, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.float32)
        img += np.asarray(Image.fromarray(np.uint8(g + 128)).resize((w, h), Image.BICUBIC),
                          np.float32) - 128
    elif kind == 2:  # stripes
        period = rng.uniform(4, 24)
        a = rng.uniform(0, math.pi)
        s = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)
        img += s[..., None] * rng.uniform(10, 50, 3)
    elif kind == 3:  # checker / bricks
        cell = int(rng.integers(6, 24))
        chk = ((xx // cell + yy // cell) % 2)[..., None]
        img += (chk - 0.5) * rng.uniform(10, 60, 3)
    img = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):  # clutter
        c = _random_colour(rng)
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        k = rng.integers(3)
        if k == 0:
            draw.ellipse([x0, y0, x1, y1], fill=c if rng.random() < 0.5 else None,
                         outline=c, width=int(rng.integers(1, 4)))
        elif k == 1:
            draw.line([x0, y0, x1, y1], fill=c, width=int(rng.integers(1, 6)))
        else:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=c)
    return img


def _distractor(rng, draw, size, colour):
    """A non-text symbol: star, arrow, cross or ring."""
    h, w = size
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = rng.uniform(0.03, 0.12) * min(h, w)
    kind = rng.integers(4)
    lw = max(1, int(r / 4))
    if kind == 0:
        pts = [(cx + (r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5 + 0.3),
                cy + (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5 + 0.3))
               for i in range(10)]
        draw.polygon(pts, fill=colour)
    elif kind == 1:
        a = rng.uniform(0, 2 * math.pi)
        dx, dy = r * math.cos(a), r * math.sin(a)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=lw)
        draw.polygon([(cx + dx, cy + dy), (cx + dx * 0.4 - dy * 0.5, cy + dy * 0.4 + dx * 0.5),
                      (cx + dx * 0.4 + dy * 0.5, cy + dy * 0.4 - dx * 0.5)], fill=colour)
    elif kind == 2:
        draw.line([cx - r, cy, cx + r, cy], fill=colour, width=lw)
        draw.line([cx, cy - r, cx, cy + r], fill=colour, width=lw)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=lw)


def _glyph(font, ch):
    """The character's alpha mask, tightly cropped, as an 'L' image (None for blank glyphs)."""
    bbox = font.getbbox(ch)
    gw, gh = max(bbox[2] - bbox[0], 1), max(bbox[3] - bbox[1], 1)
    im = Image.new("L", (gw + 4, gh + 4), 0)
    ImageDraw.Draw(im).text((2 - bbox[0], 2 - bbox[1]), ch, font=font, fill=255)
    box = im.getbbox()
    return im.crop(box) if box else None


def render_sample(rng: np.random.Generator, size=(128, 128), max_words: int = 3):
    h, w = size
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # distractors below the text
        _distractor(rng, draw, size, _random_colour(rng))
    alpha = Image.new("L", (w, h), 0)
    boxes = []
    text_layer = Image.new("RGB", (w, h))
    for _ in range(int(rng.integers(1, max_words + 1))):
        word = "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=int(rng.integers(2, 9))))
        fsize = int(rng.uniform(*TEXT_SIZE) * min(h, w))
        font = _pick_font(rng, max(fsize, 8))
        glyphs = [_glyph(font, c) for c in word]
        advances = [font.getlength(c) for c in word]
        total = sum(advances)
        curved = rng.random() < 0.35
        angle = rng.uniform(-45, 45) if rng.random() < 0.6 else 0.0
        x0, y0 = rng.uniform(0.05, 0.7) * w, rng.uniform(0.15, 0.9) * h
        colour = _random_colour(rng)
        radius = rng.uniform(0.8, 2.5) * total * (1 if rng.random() < 0.5 else -1)
        pos = 0.0
        for g, adv in zip(glyphs, advances):
            centre = pos + adv / 2
            pos += adv
            if g is None:
                continue
            if curved:  # along a circular arc: tangent angle grows with the arc length
                theta = centre / radius
                dx = radius * math.sin(theta)
                dy = -radius * (1 - math.cos(theta))
                rot = angle + math.degrees(theta)
            else:
                dx, dy, rot = centre, 0.0, angle
            a = math.radians(angle)
            cx = x0 + dx * math.cos(a) + dy * math.sin(a)
            cy = y0 - dx * math.sin(a) + dy * math.cos(a)
            gr = g.rotate(rot, resample=Image.BILINEAR, expand=True)
            px, py = int(round(cx - gr.width / 2)), int(round(cy - gr.height / 2))
            alpha.paste(gr, (px, py), gr)
            box = gr.getbbox()
            if box is None:
                continue
            bx0, by0 = max(px + box[0], 0), max(py + box[1], 0)
            bx1, by1 = min(px + box[2], w), min(py + box[3], h)
            if bx1 > bx0 and by1 > by0:
                boxes.append((bx0, by0, bx1, by1))
        text_layer.paste(Image.new("RGB", (w, h), colour), (0, 0), alpha)
    # Contrast: push the text colour away from the local background so words stay legible.
    bg = np.asarray(img, np.float32)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    fg = np.asarray(text_layer, np.float32)
    too_close = np.abs(fg - bg).sum(-1, keepdims=True) < 120
    fg = np.where(too_close, 255.0 - bg, fg)
    out = bg * (1 - a) + fg * a
    composed = np.uint8(np.clip(out, 0, 255))
    out_img = Image.fromarray(composed)
    draw = ImageDraw.Draw(out_img)
    for _ in range(int(rng.integers(0, 3))):  # a few distractors may overlap the text
        _distractor(rng, draw, size, _random_colour(rng))
    mask = (np.asarray(alpha) > 127).astype(np.uint8)
    # A distractor drawn over a glyph hides it: those pixels are background now.
    mask[(np.asarray(out_img) != composed).any(-1)] = 0
    if rng.random() < 0.5:
        out_img = out_img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(out_img, np.float32) + rng.normal(0, rng.uniform(0, 8), (h, w, 3))
    return np.uint8(np.clip(arr, 0, 255)), mask, np.asarray(boxes, np.float32).reshape(-1, 4)
