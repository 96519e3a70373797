"""The atlas as a static site, written into ``<atlas>/site/``: a model page, a page per layer
(every unit's picture in a grid, sortable by unit, activation or reading) and a page per unit
(its optimized image with its setting, top-k patches and their deconv, the most negative ones
when mined, its reading, its activation distribution as a plot, links to the neighbouring units
and layers).

Plain HTML and CSS with one small script (sorting a layer's grid): no framework and no CDN, so it
opens from the file system (file://) as from any static server. Every link and image is relative
to the page. Pages are written once (6,400 units: a few seconds); images are the atlas's own
JPEGs, loaded lazily (``loading="lazy"``), never copied.
"""
from __future__ import annotations

import html
import json
import os

import numpy as np

from ..files import write_text
from .store import AtlasStore, describe, layer_slug, load_reading

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
a{color:#1a55a0}nav{margin-bottom:1em}nav a{margin-right:1em}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:136px;font-size:12px;text-decoration:none;color:#222}
.cell img{width:128px;height:128px;object-fit:contain;background:#282828;display:block}
.cell .nopic{width:128px;height:128px;background:#e4e4e4;color:#999;display:flex;align-items:center;
justify-content:center}.cell .r{color:#666;display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.panels{display:flex;flex-wrap:wrap;gap:16px}.panel{width:300px;background:#fff;padding:8px;border:1px solid #ddd}
.panel img{width:300px;height:300px;object-fit:contain;background:#282828;display:block}
.panel h3{margin:0 0 6px 0;font-size:14px}.note{color:#666;font-size:13px}
.missing{width:300px;height:300px;display:flex;align-items:center;justify-content:center;color:#999;
background:#eee}svg{background:#fff;border:1px solid #ddd}button{margin-right:6px}
"""

SORT_JS = """// sorts the layer's grid by a data attribute of its cells (unit, act, read)
function sortGrid(key, descending) {
  var grid = document.getElementById('grid');
  var cells = Array.prototype.slice.call(grid.children);
  cells.sort(function (a, b) {
    var x = a.dataset[key], y = b.dataset[key];
    var nx = parseFloat(x), ny = parseFloat(y);
    var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
    if (c === 0) c = parseFloat(a.dataset.unit) - parseFloat(b.dataset.unit);
    return descending ? -c : c;
  });
  cells.forEach(function (c) { grid.appendChild(c); });
}
"""

KINDS = [("regularized_opt", "optimized image"), ("max_im", "top {k} patches"), ("max_deconv", "their {mode}"),
         ("min_im", "most negative {k}")]


def _page(title: str, body: list[str], depth: int, script: bool = False) -> str:
    up = "../" * depth
    head = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>", f'<link rel="stylesheet" href="{up}site.css">']
    if script:
        head.append(f'<script src="{up}sort.js"></script>')
    return "\n".join(head + ["</head><body>"] + body + ["</body></html>"]) + "\n"


def _unit_name(u: int) -> str:
    return f"{int(u):04d}.html"


def _histogram_svg(dist: dict | None, unit: int, top: list[float], width: int = 420, height: int = 150) -> str:
    """The unit's spatial maximum over the sample as bars, the corpus's top-k values as red ticks."""
    if not dist:
        return "<p class='note'>no distribution stored</p>"
    counts = np.asarray(dist["counts"][unit], float)
    lo, hi = float(dist["lo"][unit]), float(dist["hi"][unit])
    left, bottom = 40, 24
    w, h = width - left - 8, height - bottom - 8
    peak = max(counts.max(), 1.0)
    bw = w / len(counts)
    parts = [f"<svg role='img' aria-label='activation distribution' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg'>"]
    for i, c in enumerate(counts):
        bh = h * c / peak
        parts.append(f"<rect x='{left + i * bw:.1f}' y='{8 + h - bh:.1f}' width='{max(bw - 1, 1):.1f}' "
                     f"height='{bh:.1f}' fill='#6a8fc7'/>")
    span = hi - lo if hi > lo else 1.0
    for v in top:
        x = left + min(max((v - lo) / span, 0.0), 1.0) * w
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='8' y2='{8 + h}' stroke='#c0392b' stroke-width='1'/>")
    parts.append(f"<line x1='{left}' x2='{left + w}' y1='{8 + h}' y2='{8 + h}' stroke='#333'/>")
    parts.append(f"<text x='{left}' y='{height - 6}' font-size='11'>{lo:.3g}</text>")
    parts.append(f"<text x='{left + w}' y='{height - 6}' font-size='11' text-anchor='end'>{hi:.3g}</text>")
    parts.append(f"<text x='4' y='16' font-size='11'>{int(peak)}</text></svg>")
    return "".join(parts)


def _optimized(store: AtlasStore, layer: str) -> dict:
    path = os.path.join(store.root, "regularized_opt", layer_slug(layer), "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _setting_words(setting: dict | None) -> str:
    if not setting:
        return "setting not recorded"
    name = setting.get("name")
    keys = ("decay", "blur_radius", "blur_every", "norm_pct", "contrib_pct", "steps", "lr")
    rest = ", ".join(f"{k} {setting[k]}" for k in keys if setting.get(k) is not None)
    fast = (setting.get("fast") or {}).get("convergence")
    if fast:  # optimize.fast=true: each unit stopped once converged (optvis/convergence.py)
        rest += (f"; fast mode: stopped once the last {fast.get('window')} steps gained under "
                 f"{100 * float(fast.get('rel_tol', 0)):g}%, from step {fast.get('min_steps')}")
    if setting.get("pre_activation"):  # optimize.pre_activation=true (optvis/preactivation.py)
        rest += f"; the value before {setting['pre_activation']} (its ReLU) was maximized"
    if setting.get("numerics"):  # optimize.numerics=bf16 or portable; float32 is not recorded
        rest += f"; numerics {setting['numerics']}"
    return (f"{name}: " if name else "") + rest


def _ended(record: dict) -> str:
    """Why the unit's run ended early, if it did: a convergence stop or the optimizer's own stop."""
    if record.get("converged_at") is not None:
        return f"; converged, stopped after step {record['converged_at']}"
    stop = record.get("stopped")
    return f"; stopped at step {stop.get('step')}: {stop.get('reason')}" if isinstance(stop, dict) else ""


def write_site(atlas_dir) -> str:
    """Write the site; returns the path of its model page (site/index.html)."""
    store = AtlasStore(atlas_dir)
    m = store.manifest() or {}
    e = html.escape
    layers = list(m.get("layers", {}))
    site = store.path("site")
    os.makedirs(site, exist_ok=True)
    write_text(os.path.join(site, "site.css"), CSS)
    write_text(os.path.join(site, "sort.js"), SORT_JS)
    mining = m.get("mining", {})
    corpus = mining.get("corpus", {})
    name = str(mining.get("backend", {}).get("name") or m.get("backend", {}).get("name") or "?")
    k = int(m.get("top_k") or 9)
    rows = []
    per_layer = {l: (_optimized(store, l), load_reading(store.root, l)) for l in layers}  # read once
    for l in layers:
        info = m["layers"][l]
        rf = info.get("receptive_field") or {}
        field = ("whole input" if rf.get("whole") else f"{rf.get('size_y')}x{rf.get('size_x')} px, stride "
                 f"{rf.get('stride_y')}") if rf else "?"
        mont = m.get("montages", {}).get(l, {})
        opt, reading = per_layer[l]
        rows.append(f"<tr><td><a href='{e(layer_slug(l))}/index.html'>{e(l)}</a></td><td>{info.get('channels')}</td>"
                    f"<td>{e(str(tuple(info.get('shape') or ())))}</td><td>{e(field)}"
                    f"{' (' + e(str(rf.get('method'))) + ')' if rf.get('method') else ''}</td>"
                    f"<td>{e(str(mont.get('mode', '-')))}{', ' + e(mont['backprop']) if mont.get('backprop') else ''}</td>"
                    f"<td>{len(opt.get('units', {}))}"
                    f"{' (' + e(_setting_words(opt.get('setting'))) + ')' if opt.get('units') else ''}</td>"
                    f"<td>{e(reading['basis'] + ' by ' + reading['judge']) if reading else '-'}</td></tr>")
    body = [f"<h1>Unit atlas of {e(name)}</h1>",
            f"<p>Weights {e(str(mining.get('backend', {}).get('weights_sha256', ''))[:12])}; corpus: "
            f"{e(str(corpus.get('kind', '?')))} {e(str(corpus.get('source') or ''))}, {corpus.get('count', '?')} images; "
            f"top {k} per unit{'; most negative too' if m.get('negatives') else ''}; numerics "
            f"{e(str(mining.get('numerics', 'default')))}.</p>",
            "<p class='note'>A unit's reading is what a judge network says its top patches show: a description "
            "of what it responds to in this corpus, not a proven concept.</p>",
            "<table><tr><th>layer</th><th>units</th><th>shape</th><th>receptive field</th><th>montages</th>"
            "<th>optimized</th><th>reading</th></tr>", *rows, "</table>"]
    write_text(os.path.join(site, "index.html"), _page(f"unit atlas: {name}", body, 0))
    for li, l in enumerate(layers):
        _write_layer(store, m, layers, li, k, *per_layer[l])
    return os.path.join(site, "index.html")


def _layer_nav(layers, li) -> list[str]:
    e = html.escape
    nav = ["<a href='../index.html'>model</a>"]
    if li > 0:
        nav.append(f"<a href='../{e(layer_slug(layers[li - 1]))}/index.html'>&larr; {e(layers[li - 1])}</a>")
    if li + 1 < len(layers):
        nav.append(f"<a href='../{e(layer_slug(layers[li + 1]))}/index.html'>{e(layers[li + 1])} &rarr;</a>")
    return nav


def _write_layer(store: AtlasStore, m: dict, layers: list[str], li: int, k: int, opt: dict,
                 reading: dict | None) -> None:
    e = html.escape
    l = layers[li]
    slug = layer_slug(l)
    folder = store.path("site", slug)
    os.makedirs(folder, exist_ok=True)
    n = int(m["layers"][l].get("channels") or 0)
    try:
        arrays = store.layer_arrays(l)
        values = arrays["values"]
    except Exception:  # a layer without mined arrays still gets its pages (optimized images only)
        values = None
    mode = (m.get("montages", {}).get(l) or {}).get("mode", "deconv")
    mode_words = {"guided": "guided backprop", "gradient": "gradient"}.get(mode, "deconv")
    dist = (reading or {}).get("distribution")

    def rel(kind, u):  # from site/<layer>/ to the atlas's own image
        p = store.unit_file(kind, l, u)
        return os.path.relpath(p, folder) if os.path.isfile(p) else None

    cells = []
    for u in range(n):
        pic = rel("regularized_opt", u) or rel("max_im", u)
        act = float(values[u, 0]) if values is not None and np.isfinite(values[u, 0]) else float("nan")
        top = reading["units"][u][0] if reading and u < len(reading["units"]) and reading["units"][u] else None
        img = (f"<img loading='lazy' src='{e(pic)}' alt='unit {u}'>" if pic else "<div class='nopic'>no picture yet</div>")
        cells.append(f"<a class='cell' href='{_unit_name(u)}' data-unit='{u}' data-act='{act:.6g}' "
                     f"data-read='{e(top[0]) if top else '~'}'>{img}<span>unit {u}"
                     f"{'' if np.isnan(act) else f' · {act:.3g}'}</span>"
                     f"<span class='r'>{e(top[0] + ' ' + str(top[1]) + '/' + str(reading['k'])) if top else ''}</span></a>")
        _write_unit(store, folder, layers, li, u, n, k, rel, values, reading, dist, opt, mode_words)
    body = ["<nav>" + "".join(_layer_nav(layers, li)) + "</nav>", f"<h1>{e(l)}</h1>",
            f"<p>{n} units; each shows its optimized image where one was made, else its top {k} patches.</p>",
            "<p>sort by <button onclick=\"sortGrid('unit', false)\">unit</button>"
            "<button onclick=\"sortGrid('act', true)\">activation</button>"
            "<button onclick=\"sortGrid('read', false)\">reading</button></p>",
            "<div class='grid' id='grid'>", *cells, "</div>"]
    write_text(os.path.join(folder, "index.html"), _page(f"{l}: {n} units", body, 1, script=True))


def _write_unit(store, folder, layers, li, u, n, k, rel, values, reading, dist, opt, mode_words) -> None:
    e = html.escape
    l = layers[li]
    nav = ["<a href='../index.html'>model</a>", f"<a href='index.html'>{e(l)}</a>"]
    if u > 0:
        nav.append(f"<a href='{_unit_name(u - 1)}'>&larr; unit {u - 1}</a>")
    if u + 1 < n:
        nav.append(f"<a href='{_unit_name(u + 1)}'>unit {u + 1} &rarr;</a>")
    nav += [a.replace("/index.html'>", "/0000.html'>") for a in _layer_nav(layers, li)[1:]]
    panels = []
    record = (opt.get("units") or {}).get(str(u))
    for kind, title in KINDS:
        p = rel(kind, u)
        if kind == "min_im" and p is None:
            continue  # mined without negatives
        words = title.format(k=k, mode=mode_words)
        note = ""
        if kind == "regularized_opt" and record:
            note = (f"<p class='note'>{e(_setting_words(opt.get('setting')))}; activation "
                    f"{record.get('best_activation', float('nan')):.3g} at step {record.get('best_step')}"
                    f"{_ended(record)}</p>")
        img = (f"<img loading='lazy' src='{e(p)}' alt='{e(words)}'>" if p else
               f"<div class='missing'>{'not made yet (deepvis-optimize)' if kind == 'regularized_opt' else 'missing'}</div>")
        panels.append(f"<div class='panel' data-kind='{kind}'><h3>{e(words)}</h3>{img}{note}</div>")
    line = describe(reading, u)
    top = [] if values is None else [float(v) for v in values[u] if np.isfinite(v)]
    body = ["<nav>" + "".join(nav) + "</nav>", f"<h1>{e(l)}, unit {u}</h1>",
            f"<p class='reading'>{e(line) if line else 'no reading stored'}"
            f"{' <span class=note>(judged by ' + e(reading['judge']) + ', a description, not a proven concept)</span>' if line else ''}</p>",
            "<div class='panels'>", *panels, "</div>",
            "<h2>Activation over the corpus</h2>",
            f"<p class='note'>Its spatial maximum on {dist['images'] if dist else '?'} corpus images (bars) and its top "
            f"{k} values in the whole corpus (red): {', '.join(f'{v:.3g}' for v in top)}.</p>",
            _histogram_svg(dist, u, top) if dist and u < len(dist["counts"]) else "<p class='note'>not stored</p>"]
    write_text(os.path.join(folder, _unit_name(u)), _page(f"{l}:{u}", body, 1))
