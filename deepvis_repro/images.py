"""Image I/O and conversion shared by every backend, the optimizer and the live view."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import DeepvisError

Image.MAX_IMAGE_PIXELS = 20000 * 20000


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any HxW, HxWx1, HxWx3 or HxWx4 array (uint8, uint16, bool or float in 0..1) -> HxWx3 uint8."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise DeepvisError(f"expected an HxW or HxWxC image with C in 1..4, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise DeepvisError(f"unsupported image dtype {a.dtype}")
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 2:  # gray + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif c == 4:  # drop alpha: composite on black would darken transparent areas unpredictably
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, with one clear error for a missing or unreadable file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeepvisError(f"image not found: {path}")
    if os.path.isdir(path):
        raise DeepvisError(f"image path is a folder, not a file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.uint16)
            elif im.mode in ("RGB", "L", "RGBA", "LA"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DeepvisError(f"cannot read image {path}: {e}") from None
    return to_rgb_uint8(arr)


def resize_for_input(image: np.ndarray, size: tuple[int, int], crop: bool = True) -> np.ndarray:
    """Fit an RGB uint8 image to (H, W): crop=True resizes the shorter side and centre-crops
    (keeps the aspect ratio, like the original's default); crop=False stretches."""
    h, w = size
    img = Image.fromarray(to_rgb_uint8(image))
    if not crop:
        return np.asarray(img.resize((w, h), Image.BILINEAR))
    iw, ih = img.size
    scale = max(w / iw, h / ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    Image.fromarray(to_rgb_uint8(image)).save(os.fspath(path))


def stretch_around_grey(x: np.ndarray) -> np.ndarray:
    """A signed HxWxC array centred on 0 (a mean-subtracted image, a gradient) -> uint8 with 0 at
    mid-grey and the largest |value| at 0 or 255: faint structure made visible."""
    x = np.asarray(x, dtype=np.float64)
    m = max(float(np.abs(x).max()), 1e-12)
    return np.clip(np.round(127.5 + 127.5 * x / m), 0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def figure_grid(rows: list[list[np.ndarray]], row_labels=None, col_labels=None, tile: int | None = None,
                pad: int = 4, font_size: int = 14) -> np.ndarray:
    """A labelled figure like the paper's: one row per setting, one column per unit, a label
    left of each row and above each column (long labels wrap). White background."""
    from PIL import ImageDraw

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    first = next(im for r in rows for im in r if im is not None)
    tile = tile or first.shape[0]
    font = _font(font_size)
    left = (max(len(str(s)) for s in row_labels) * font_size * 0.6 + 2 * pad) if row_labels else 0
    top = (2 * font_size + 3 * pad) if col_labels else 0
    width = int(left + n_cols * (tile + pad) + pad)
    height = int(top + n_rows * (tile + pad) + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = int(top + pad + r * (tile + pad))
        if row_labels:
            draw.text((pad, y + tile // 2 - font_size // 2), str(row_labels[r]), fill="black", font=font)
        for c, im in enumerate(row):
            if im is None:
                continue
            x = int(left + pad + c * (tile + pad))
            canvas.paste(Image.fromarray(to_rgb_uint8(im)).resize((tile, tile), Image.BILINEAR), (x, y))
    if col_labels:
        chars = max(4, int(tile / (font_size * 0.55)))
        for c, label in enumerate(col_labels):
            x = int(left + pad + c * (tile + pad))
            text = str(label)
            lines = [text[:chars], text[chars:2 * chars]] if len(text) > chars else [text]
            for k, line in enumerate(lines):
                draw.text((x, pad + k * (font_size + pad)), line, fill="black", font=font)
    return np.asarray(canvas)
