"""Looking at an atlas: index.html (every mined unit's pictures, by layer; opens offline)."""
from __future__ import annotations

import html
import os

from ..files import write_text
from .store import AtlasStore, layer_slug

KIND_TITLES = {"regularized_opt": "optimized", "max_im": "top-9 patches", "max_deconv": "their deconv",
               "min_im": "most negative"}


def write_index(atlas_dir, max_units: int | None = None) -> str:
    """index.html: per layer, a row per unit with whatever pictures the atlas has (lazy-loaded,
    relative links)."""
    store = AtlasStore(atlas_dir)
    m = store.manifest() or {}
    e = html.escape
    mining = m.get("mining", {})
    corpus = mining.get("corpus", {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>unit atlas: {e(str(mining.get('backend', {}).get('name', '')))}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td{padding:4px;vertical-align:top}"
             "img{height:160px}h2{margin-top:2em}.u{font-family:monospace}</style></head><body>",
             f"<h1>Unit atlas of {e(str(mining.get('backend', {}).get('name', '?')))}</h1>",
             f"<p>Corpus: {e(str(corpus.get('kind', '?')))} {e(str(corpus.get('source', '')))}, "
             f"{corpus.get('count', '?')} images; top {m.get('top_k', '?')} per unit; "
             f"{m.get('skipped', 0)} unreadable (skipped.tsv).</p>"]
    layers = list(m.get("layers", {}))
    parts.append("<p>" + " · ".join(f"<a href='#{e(layer_slug(l))}'>{e(l)}</a>" for l in layers) + "</p>")
    for l in layers:
        info = m["layers"][l]
        mode = m.get("montages", {}).get(l, {}).get("mode", "deconv")
        rf = info.get("receptive_field") or {}
        field = ("whole input" if rf.get("whole") else f"{rf.get('size_y')}x{rf.get('size_x')} px, "
                 f"stride {rf.get('stride_y')}") if rf else "?"
        parts.append(f"<h2 id='{e(layer_slug(l))}'>{e(l)}</h2><p>{info.get('channels')} units; "
                     f"receptive field {e(field)}; back mode {e(mode)}</p><table>")
        n = int(info.get("channels", 0))
        for u in range(n if max_units is None else min(n, max_units)):
            cells = []
            for kind in KIND_TITLES:
                p = store.unit_file(kind, l, u)
                if os.path.isfile(p):
                    rel = os.path.relpath(p, store.root)
                    cells.append(f"<td><img loading='lazy' src='{e(rel)}' alt='{e(KIND_TITLES[kind])}' "
                                 f"title='{e(KIND_TITLES[kind])}'></td>")
            if cells:
                parts.append(f"<tr><td class='u'>{e(l)}:{u}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = store.path("index.html")
    write_text(path, "\n".join(parts) + "\n")
    return path
