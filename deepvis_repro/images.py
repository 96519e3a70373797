"""Image I/O and conversion shared by every backend, the optimizer and the live view."""
from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image

from .errors import DeepvisError
from .files import write_bytes

#: Larger images are refused with a clear message before they are decoded: a 3 MB PNG can
#: declare 28000x28000 pixels (5.9 GB once decoded). 100 MP is a 10000x10000 photo.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _scaled_to_uint8(a: np.ndarray) -> np.ndarray:
    """Floats and wide integers -> uint8 by their own range: floats in 0..1 (or 0..255) as such,
    integers by their dtype's range when they use it (16-bit photos), else by their maximum."""
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            scale = 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scale = 1.0
        else:  # any other range: stretch min..max
            a, scale = a - lo, 255.0 / max(hi - lo, 1e-12)
        return (np.clip(a * scale, 0.0, 255.0) + 0.5).astype(np.uint8)
    hi = int(a.max(initial=0))
    lo = int(a.min(initial=0))
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    a = a.astype(np.float64) - min(lo, 0)
    return (a * (255.0 / max(float(a.max()), 1.0)) + 0.5).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any HxW, HxWx1, HxWx3 or HxWx4 array -> HxWx3 uint8. uint8 as is; uint16 by its range;
    bool as 0/255; floats in 0..1 (or 0..255) as such, other ranges stretched; other integers
    by their range (never wrapped)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise DeepvisError(f"expected an HxW or HxWxC image with C in 1..4, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        a = _scaled_to_uint8(a)
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


#: ITU-R 601 luma weights (R, G, B): the grey a 1-channel model is fed (grey_rgb, through Pillow's
#: "L", which uses them) and the grey of every statistic taken for such a model (its default mean)
LUMA = (0.299, 0.587, 0.114)


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxWx3 uint8 whose three channels are its ITU-R 601 luma (Pillow's "L",
    as grayscale models' training pipelines make it): what a 1-channel model sees, shown grey."""
    luma = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, with one clear error for a missing or unreadable file."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeepvisError(f"image not found: {path}") from None
    except OSError as e:
        raise DeepvisError(f"cannot read image {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DeepvisError(f"image path is a folder, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block the reader forever
        raise DeepvisError(f"cannot read image {path}: not a regular file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{w}x{h}")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    arr = np.asarray(im)  # 16/32-bit integers, 32-bit floats: scaled by range below
                    if arr.dtype.byteorder not in ("=", "|"):
                        arr = arr.astype(arr.dtype.newbyteorder("="))
                elif im.mode in ("RGB", "L", "RGBA", "LA"):
                    arr = np.asarray(im)
                else:
                    arr = np.asarray(im.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DeepvisError(f"cannot read image {path}: {image_size_text(path)} is more than the "
                           f"{MAX_PIXELS // 1_000_000} MP limit (a decompression bomb, or resize it first)") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise DeepvisError(f"cannot read image {path}: {e}") from None
    return to_rgb_uint8(arr)


def image_size_text(path) -> str:
    """'28000x28000 = 784 MP' from the header only (never decodes the pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as im:
                    w, h = im.size
            finally:
                Image.MAX_IMAGE_PIXELS = old
        return f"{w}x{h} = {w * h / 1e6:.0f} MP"
    except Exception:
        return "its size"


#: interpolation names (timm's pretrained_cfg) -> Pillow's filters
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resize_for_input(image: np.ndarray, size: tuple[int, int], crop: bool = True,
                     resize: tuple[int, int] | None = None, crop_pct: float = 1.0,
                     interpolation: str = "bilinear") -> np.ndarray:
    """Fit an RGB uint8 image to (H, W): crop=True resizes the shorter side and centre-crops
    (keeps the aspect ratio, like the original's default); crop=False stretches.
    resize=(h, w) first stretches the image to that size and then centre-crops (H, W): Caffe's
    transform (256x256, then a 227 crop), as CaffeNet and other Caffe-era models were trained."""
    h, w = size
    img = Image.fromarray(to_rgb_uint8(image))
    if crop and not resize and (crop_pct != 1.0 or interpolation != "bilinear"):
        return _timm_eval(img, h, w, crop_pct, interpolation)
    if resize:
        rh, rw = int(resize[0]), int(resize[1])
        if rh < h or rw < w:
            raise DeepvisError(f"resize {rh}x{rw} is smaller than the input {h}x{w}")
        img = img.resize((rw, rh), Image.BILINEAR)
        top, left = (rh - h) // 2, (rw - w) // 2
        return np.asarray(img.crop((left, top, left + w, top + h)))
    if not crop:
        return np.asarray(img.resize((w, h), Image.BILINEAR))
    iw, ih = img.size
    scale = max(w / iw, h / ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


def _timm_eval(img: Image.Image, h: int, w: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's eval transform with torchvision's arithmetic (Resize of the shorter side, CenterCrop):
    the same pixels a timm user's pipeline feeds the model."""
    import math

    if interpolation not in INTERPOLATIONS:
        raise DeepvisError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{interpolation}'")
    if not 0 < crop_pct <= 1:
        raise DeepvisError(f"crop_pct must be in (0, 1], got {crop_pct}")
    iw, ih = img.size
    if h == w:  # torchvision's Resize(int): the shorter side to it, the longer truncated
        short = math.floor(h / crop_pct)
        nw, nh = (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
    else:  # timm's ResizeKeepRatio for a non-square input: the shorter side's ratio on both
        ratio = max(math.floor(h / crop_pct) / ih, math.floor(w / crop_pct) / iw)
        nw, nh = round(iw * ratio), round(ih * ratio)
    img = img.resize((nw, nh), INTERPOLATIONS[interpolation])
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    return np.asarray(img.crop((left, top, left + w, top + h)))


def save_image(path, image, quality: int = 92, fsync: bool = False) -> None:
    """An HxWx{1,3} uint8 image as PNG or JPEG (by the suffix), written atomically."""
    path = os.fspath(path)
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(to_rgb_uint8(image)).save(buf, fmt, **kw)
    write_bytes(path, buf.getvalue(), fsync=fsync)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Written atomically: the file is whole or absent, whatever happens while writing."""
    save_image(path, image)


def faded(image: np.ndarray, weight: np.ndarray, pct: float = 99.0) -> np.ndarray:
    """MACO's transparency view: the image over white, each pixel as opaque as its weight (an
    attribution map, HxW >= 0) relative to the map's pct-th percentile, so that the parts of the
    image the unit used stand out and the rest fades away."""
    w = np.asarray(weight, dtype=np.float64)
    a = np.clip(w / max(float(np.percentile(w, pct)), 1e-12), 0.0, 1.0)[..., None]
    return np.round(image.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def stretch_around_grey(x: np.ndarray) -> np.ndarray:
    """A signed HxWxC array centred on 0 (a mean-subtracted image, a gradient) -> uint8 with 0 at
    mid-grey and the largest |value| at 0 or 255: faint structure made visible."""
    x = np.asarray(x, dtype=np.float64)
    m = max(float(np.abs(x).max()), 1e-12)
    return np.clip(np.round(127.5 + 127.5 * x / m), 0, 255).astype(np.uint8)


def stretched(img: np.ndarray) -> np.ndarray:
    """An image (uint8, 0..255) with its deviation from mid-grey stretched to the full range: how
    optimized images are shown (short runs and strong regularization leave faint images; the
    stored file is untouched)."""
    return stretch_around_grey(np.asarray(img).astype(np.float64) - 127.5)


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
