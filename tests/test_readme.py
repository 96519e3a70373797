"""The README's Python block runs as written (on a folder of real photos), and the public API
can be called again and again."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_block_runs(tmp_path, photos, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 1
    (tmp_path / "photos").mkdir()
    for i, (name, im) in enumerate(photos.items()):
        for k in range(3):  # 12 real photos: enough for a top-9
            crop = im[k * 20:k * 20 + 300, k * 30:k * 30 + 300]
            Image.fromarray(crop if crop.ndim == 3 else np.stack([crop] * 3, -1)).save(
                tmp_path / "photos" / f"{name}_{k}.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    result, r = scope["result"], scope["r"]
    assert result.images.shape == (2, 224, 224, 3) and result.images.dtype == np.uint8
    assert r.values["fc"][967].shape == (9,) and r.positions["blocks.5"][3].shape == (9, 2)
    # the same call again works (the package's optimize stays the function)
    import deepvis_repro as dv
    again = dv.optimize(scope["backend"], ["fc:130"], steps=2, progress=False)
    again = dv.optimize(scope["backend"], ["fc:130"], steps=2, progress=False)
    assert again.images.shape == (1, 224, 224, 3)
