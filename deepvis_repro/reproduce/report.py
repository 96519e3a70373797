"""report.html: the grid, the measures per setting and per image, the reference comparison and
how the run was made; one self-contained page that reads offline (images are relative links)."""
from __future__ import annotations

import html
import json

from ..files import write_text
from .stats import fmt_interval, fmt_p


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def fmt_rank(v) -> str:
    """A (median) rank as the console and the report both show it: 80, 80.5, or -."""
    if v is None:
        return "–"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def write_report(path, metrics: dict, has_grid: bool = True) -> None:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>deepvis-reproduce: {e(metrics['backend'])}, profile {e(metrics['profile'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#eee}td.l,th.l{text-align:left}.bad{background:#fdd}.miss{color:#888}"
        "img.t{width:96px;height:96px;image-rendering:auto}</style>",
        "</head>", "<body>",
        "<h1>Reproduction of Yosinski et al. (2015), Table 1 settings</h1>",
        f"<p>Backend <b>{e(metrics['backend'])}</b>, profile <b>{e(metrics['profile'])}</b>, "
        f"seed {metrics['seed']}, {metrics['seconds']:.0f} s.</p>",
    ]
    if metrics.get("verdict"):
        ok = not metrics.get("failures")
        parts.append(f"<p class='{'' if ok else 'bad'}' style='font-size:1.3em'><b>{e(metrics['verdict'])}</b></p>")
    if metrics.get("interrupted"):
        partial = ", ".join(metrics.get("partial_settings") or [])
        parts.append("<p class='bad'><b>Interrupted</b>: this report holds what was finished before Ctrl-C"
                     + (f"; {e(partial)} stopped early and is marked partial" if partial else "") + ".</p>")
    if metrics.get("claim_line"):
        parts.append(f"<p style='font-size:1.1em'><b>{e(metrics['claim_line'])}</b></p>")
    parts.append(_how_compared(metrics))
    if metrics.get("failures"):
        parts.append(f"<p class='bad'><b>{len(metrics['failures'])} image(s) differ from their references</b> "
                     f"beyond rounding (not identical, and SSIM &lt; {metrics['ssim_threshold']}): "
                     f"{e(', '.join(metrics['failures']))}</p>")
    if has_grid:
        parts.append('<h2>Images</h2><p>Rows: settings; columns: units.</p>'
                     '<img src="grid.png" alt="grid of optimized images" style="max-width:100%">'
                     '<p>The same, contrast-stretched around grey (faint images show their structure):</p>'
                     '<img src="grid_stretched.png" alt="contrast-stretched grid" style="max-width:100%">')
    parts.append("<h2>Per setting</h2><p>Each measure with its 95% bootstrap interval over units "
                 "(mean; the judge's rank: median).</p><table><tr><th class='l'>setting</th><th>activation</th>"
                 "<th>total variation</th><th>HF energy</th><th>median rank by judge</th>"
                 "<th>class units in judge's top-5</th></tr>")
    for s in metrics["summary"]:
        top5 = f"{s['judge_top5']}/{s['class_units']}" if s["judge_top5"] is not None else "–"
        ci = s.get("intervals") or {}
        parts.append(f"<tr><td class='l'>{e(s['setting'])}</td><td>{e(fmt_interval(ci.get('activation')))}</td>"
                     f"<td>{e(fmt_interval(ci.get('total_variation'), 4))}</td>"
                     f"<td>{e(fmt_interval(ci.get('hf_energy'), 3))}</td>"
                     f"<td>{e(fmt_interval(ci.get('judge_rank'), 0))}</td><td>{top5}</td></tr>")
    parts.append("</table>")
    parts.append(_claim_table(metrics.get("claim")))
    for name in metrics.get("plots") or []:
        alt = "objective per step" if name.startswith("objective") else "measures with intervals"
        parts.append(f'<p><img src="{e(name)}" alt="{alt}" style="max-width:100%"></p>')
    parts.append(f"<p>Judge: {e(str(metrics.get('judge')))} (rank 1 = the image is classified as the "
                 "unit's class). Total variation: mean |neighbour difference| on a 0..1 scale. HF energy: "
                 "share of spectral power above 0.25 cycles/pixel.</p>")
    parts.append("<h2>Per image</h2><table><tr><th class='l'>setting</th><th class='l'>unit</th>"
                 "<th class='l'>label</th><th>image</th><th>activation</th><th>best step</th><th>TV</th>"
                 "<th>HF</th><th>judge rank</th><th>own rank</th><th>SSIM</th><th class='l'>reference</th>"
                 "<th class='l'>compared by</th></tr>")
    for r in metrics["results"]:
        cls = "bad" if r["reference"] in ("differs", "damaged") else ("miss" if r["reference"] == "missing" else "")
        parts.append(
            f"<tr class='{cls}'><td class='l'>{e(r['setting'])}</td><td class='l'>{e(r['unit'])}</td>"
            f"<td class='l'>{_fmt(r['label'])}</td><td><img class='t' src='{e(r['image'])}' alt='{e(r['unit'])}'></td>"
            f"<td>{_fmt(r['activation'], 2)}</td><td>{r['best_step']}"
            f"{' (partial: ' + str(r.get('steps_run')) + ' of ' + str(r['steps']) + ' steps)' if r.get('partial') else ''}"
            f"</td><td>{_fmt(r['total_variation'], 4)}</td>"
            f"<td>{_fmt(r['hf_energy'], 4)}</td><td>{_fmt(r['judge_rank'])}</td><td>{_fmt(r['own_rank'])}</td>"
            f"<td>{_fmt(r['ssim'])}</td><td class='l'>{e(r['reference'])}</td>"
            f"<td class='l'>{_fmt(r.get('comparison'))}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>How this run was made</h2><pre>" + e(json.dumps(
        {k: metrics[k] for k in ("command", "backend", "profile", "seed", "references", "numerics", "machine",
                                 "reference_machine", "reference_numerics", "versions", "profile_config")
         if k in metrics}, indent=1)) + "</pre>")
    parts += ["</body>", "</html>"]
    write_text(path, "\n".join(parts) + "\n")


def _machine(m: dict | None) -> str:
    if not m:
        return "an unrecorded machine"
    return f"{m.get('cpu')} ({m.get('isa')}, {m.get('torch_threads')} threads)"


def _how_compared(metrics: dict) -> str:
    """Which comparison applied, and why: the references' machine and numerics against this run's."""
    e = html.escape
    num = (metrics.get("numerics") or {}).get("mode", metrics.get("numerics_mode"))
    native = (metrics.get("numerics") or {}).get("native_reductions")
    text = (f"This run: {e(_machine(metrics.get('machine')))}, numerics <b>{e(str(num))}</b>"
            + (f" (reductions run natively: {e(', '.join(native))})" if native else "") + ". ")
    if "reference_machine" in metrics or "reference_numerics" in metrics:
        ref_num = (metrics.get("reference_numerics") or {}).get("mode", "unrecorded")
        text += (f"References: {e(_machine(metrics.get('reference_machine')))}, numerics <b>{e(ref_num)}</b>. "
                 "Each image is first compared pixel for pixel (<i>identical</i>); where the bits differ, by the "
                 "rounding criterion: a <i>rounding twin</i> starts on the reference's trajectory, its first "
                 "objective values within a relative "
                 f"{metrics.get('rounding_tolerance', 1e-3):g} of the stored ones (a changed setting, seed or unit "
                 "moves them far more from the first steps on).")
    return f"<p>{text}</p>"


def _claim_table(c: dict | None) -> str:
    if not c or not c.get("units"):
        return ""
    e = html.escape
    rows = ["<h2>The paper's claim, tested</h2>",
            f"<p>Paired over the same {c['units']} class units, on the judge's rank of the unit's class "
            f"(lower is better): median difference with its 95% bootstrap interval, matched-pairs rank-biserial "
            f"correlation, two-sided Wilcoxon signed-rank p (significant below {c['alpha']:g}).</p>",
            "<table><tr><th class='l'>comparison</th><th>n</th><th>median rank difference</th>"
            "<th>rank-biserial</th><th>p</th><th class='l'>verdict</th></tr>"]
    for title, key in (("vs plain ascent", "vs_baseline"), ("best vs the others", "best_vs_others")):
        for t in c.get(key) or []:
            if "n" not in t:
                continue
            rows.append(f"<tr><td class='l'>{e(t['a'])} vs {e(t['b'])} ({title})</td><td>{t['n']}</td>"
                        f"<td>{t['median_difference']:g} [{t['low']:g}, {t['high']:g}]</td>"
                        f"<td>{t['rank_biserial']:.2f}</td><td>{fmt_p(t['p_value'])}</td>"
                        f"<td class='l'>{e(t['verdict'])}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)
