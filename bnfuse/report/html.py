"""The HTML report: one self-contained page (inline CSS and SVG, no network assets).

Sections: the verdict; the fusion summary; a table of every output and device
with the noise floor beside it; a histogram of |error| per output (log scale,
with the tolerance marked); and a per-layer error chart when --per-layer ran.
"""

from __future__ import annotations

import math
from html import escape

from bnfuse.report.fmt import db, num, pct
from bnfuse.result import Comparison, FuseResult, VerifyResult
from bnfuse.verify.metrics import VERDICT_RULE

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;color:#1f2328;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .25rem} h2{font-size:1.15rem;margin:2rem 0 .5rem;border-bottom:1px solid #d0d7de;padding-bottom:.25rem}
.verdict{display:inline-block;padding:.15rem .6rem;border-radius:1rem;font-weight:600;color:#fff}
.pass{background:#1a7f37} .fail{background:#cf222e} .none{background:#6e7781}
.error{color:#cf222e;font-weight:600}
table{border-collapse:collapse;width:100%;margin:.5rem 0} th,td{padding:.35rem .6rem;border-bottom:1px solid #d8dee4;text-align:right;white-space:nowrap}
th{background:#f6f8fa;font-weight:600} td:first-child,th:first-child,td.l,th.l{text-align:left}
td.wrap{white-space:normal;overflow-wrap:anywhere}
tr.bad td{background:#ffebe9} code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f6f8fa;padding:0 .25rem;border-radius:4px}
.muted{color:#656d76} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(22rem,1fr));gap:1rem}
figure{margin:0;border:1px solid #d8dee4;border-radius:6px;padding:.5rem} figcaption{font-size:12px;color:#656d76;margin-bottom:.25rem}
ul{margin:.25rem 0 .5rem 1.25rem;padding:0}
"""

_BINS = list(range(-12, 3))  # log10 |error| bin edges; the first bin also holds exact zeros


def _histogram(c: Comparison) -> str:
    counts = [0] * (len(_BINS) - 1)
    zeros = 0
    for e in c.errors:
        if e == 0:
            zeros += 1
            continue
        k = min(max(math.floor(math.log10(e)) - _BINS[0], 0), len(counts) - 1)
        counts[k] += 1
    total = max(len(c.errors), 1)
    width, height, pad = 340, 140, 24
    bar_w = (width - 2 * pad) / (len(counts) + 1)
    peak = max([zeros, *counts]) or 1
    parts = [
        f'<svg viewBox="0 0 {width} {height + 30}" width="100%" role="img" '
        f'aria-label="error histogram for {escape(c.name)}">'
    ]
    bars = [("0", zeros), *[(f"1e{_BINS[i]}", n) for i, n in enumerate(counts)]]
    for i, (label, n) in enumerate(bars):
        h = (height - pad) * n / peak
        x = pad + i * bar_w
        colour = "#8c959f" if i == 0 else "#0969da"
        parts.append(
            f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
            f'fill="{colour}"><title>{label}: {n} of {total}</title></rect>'
        )
        if i % 2 == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height + 14}" font-size="9" '
                f'text-anchor="middle" fill="#656d76">{label}</text>'
            )
    tol = c.atol + c.rtol * max(abs(c.worst_ref), 1e-300)
    if tol > 0:
        pos = 1 + (math.log10(tol) - _BINS[0])
        x = pad + min(max(pos, 1), len(bars)) * bar_w
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="#cf222e" '
            f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{pad / 2 + 8}" font-size="10" '
            f'fill="#cf222e">tolerance</text>'
        )
    parts.append(
        f'<text x="{width / 2}" y="{height + 28}" font-size="10" text-anchor="middle" '
        f'fill="#656d76">|after - before| (log scale; {total} elements sampled)</text></svg>'
    )
    return "".join(parts)


def _layer_chart(layers: list[Comparison]) -> str:
    rows = [(c.name, (c.max_abs / c.value_range) if c.value_range else c.max_abs) for c in layers]
    row_h, label_w, width = 18, 260, 720
    height = row_h * len(rows) + 30
    floor = 1e-12
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" '
        'role="img" aria-label="per-layer error">'
    ]
    for i, ((name, value), c) in enumerate(zip(rows, layers, strict=True)):
        v = max(value, floor)
        frac = (math.log10(v) - math.log10(floor)) / (0 - math.log10(floor))
        w = max(1.0, (width - label_w - 80) * min(frac, 1.0))
        y = i * row_h
        # Long names: the end shows (it tells layers apart), the whole name in the tooltip.
        label = name if len(name) <= 40 else "\u2026" + name[-39:]
        mark, fill = ("\u2717 ", "#cf222e") if not c.passed else ("", "#0969da")
        verdict = c.verdict
        style = ' fill="#cf222e" font-weight="600"' if not c.passed else ""
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" font-size="11" text-anchor="end"{style}>'
            f"<title>{escape(name)}</title>{escape(mark + label)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{fill}">'
            f"<title>{escape(name)}: {num(value)} ({verdict})</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="10" fill="#656d76">'
            f"{num(value)}</text>"
        )
    parts.append(
        f'<text x="{label_w}" y="{height - 6}" font-size="10" fill="#656d76">'
        "max |error| / range of the tensor (log scale, 1e-12 to 1)</text></svg>"
    )
    return "".join(parts)


def render(
    fusion: FuseResult | None,
    verification: VerifyResult | None,
    error: str | None = None,
    run: str = "",
) -> str:
    v = verification
    title = escape(
        str(
            v.candidate
            if v is not None
            else (fusion.input if fusion is not None else f"bnfuse {run}".strip())
        )
    )
    body = [f"<h1>bnfuse report {_badge(v, error)}</h1>", f'<div class="muted">{title}</div>']
    if error is not None:
        body.append(f'<p class="error">{escape(error)}</p>')
    if fusion is not None:
        body += _fusion(fusion)
    if v is not None:
        body += _outputs(v)
        if v.layers:
            body += _layers(v)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>bnfuse report</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _badge(v: VerifyResult | None, error: str | None) -> str:
    if error is not None:
        return '<span class="verdict fail">ERROR</span>'
    if v is None:
        return '<span class="verdict none">not verified</span>'
    if v.passed:
        return '<span class="verdict pass">PASS</span>'
    return '<span class="verdict fail">FAIL</span>'


def _fusion(fusion: FuseResult) -> list[str]:
    body = ["<h2>Fusion</h2>", f"<p>{escape(fusion.headline())}.</p>"]
    for skip, cands in fusion.skipped_by_reason().items():
        items = "".join(
            f"<li><code>{escape(c.node)}</code>: {escape(c.reason or '')}</li>" for c in cands
        )
        body.append(f"<p>Skipped {len(cands)}: {escape(skip.value)}</p><ul>{items}</ul>")
    flags = fusion.health_flags()
    if flags:
        items = "".join(f"<li><code>{escape(bn)}</code>: {escape(flag)}</li>" for bn, flag in flags)
        body.append(f"<p>Health: {len(flags)} flag(s)</p><ul>{items}</ul>")
    before, after = fusion.ops_before, fusion.ops_after
    rows = "".join(
        f"<tr><td>{escape(op)}</td><td>{before[op]}</td><td>{after[op]}</td></tr>"
        for op in sorted(set(before) | set(after))
    )
    body.append(
        f"<table><tr><th>op</th><th>before</th><th>after</th></tr>{rows}"
        f"<tr><th>total</th><th>{sum(before.values())}</th>"
        f"<th>{sum(after.values())}</th></tr></table>"
    )
    return body


_OUTPUT_HEADER = (
    "<tr><th>output</th><th class=l>device</th><th class=l>verdict</th><th>max abs</th>"
    "<th>max rel</th><th>mean abs</th><th>RMSE</th><th>cosine</th><th>SNR</th>"
    "<th>top-1</th><th>beyond tol</th><th>worst at</th><th>noise floor</th></tr>"
)


def _output_row(c: Comparison, floor: Comparison | None) -> str:
    return (
        f'<tr class="{"" if c.passed else "bad"}"><td><code>{escape(c.name)}</code></td>'
        f"<td class=l>{escape(c.device)}</td><td class=l>{c.verdict if c.passed else '<b>FAIL</b>'}</td>"
        f"<td>{num(c.max_abs)}</td><td>{num(c.max_rel)}</td><td>{num(c.mean_abs)}</td>"
        f"<td>{num(c.rmse)}</td><td>{num(c.cosine, 8)}</td><td>{db(c.snr_db)}</td>"
        f"<td>{pct(c.argmax_agreement)}</td><td>{c.failed}/{c.total}</td>"
        f"<td>{escape(str(list(c.worst_index)))}</td>"
        f"<td>{num(floor.max_abs) if floor is not None else '-'}</td></tr>"
    )


def _outputs(v: VerifyResult) -> list[str]:
    rows = "".join(_output_row(c, v.noise_for(c)) for c in v.ordered_outputs())
    body = [
        "<h2>Outputs</h2>",
        f"<p class=muted>{escape(str(v.candidate))} against {escape(str(v.original))} on "
        f"{escape(', '.join(v.devices))}; {v.samples} sample(s) of {escape(v.input_source)} "
        f"inputs, seed {v.seed}, run with {escape(v.runtime or 'onnxruntime')}. "
        f"{escape(VERDICT_RULE)}</p>",
        f"<table>{_OUTPUT_HEADER}{rows}</table>",
    ]
    if v.noise_floor:
        body.append(
            "<p class=muted>Noise floor: "
            + escape("; ".join(sorted({c.device for c in v.noise_floor})))
            + ". A fusion error at or below it changed nothing that matters.</p>"
        )
    body += [f"<p class=muted>{escape(note)}</p>" for note in v.notes]
    body.append("<h2>Error histograms</h2><div class=grid>")
    body += [
        f"<figure><figcaption><code>{escape(c.name)}</code> on {escape(c.device)}"
        f"</figcaption>{_histogram(c)}</figure>"
        for c in v.ordered_outputs()
    ]
    body.append("</div>")
    return body


def _layers(v: VerifyResult) -> list[str]:
    body = ["<h2>Per layer</h2>"]
    worst, first = v.worst_layer, v.first_failing_layer
    if worst is not None:
        body.append(
            f"<p>Worst layer: <code>{escape(worst.name)}</code> "
            f"(max abs {num(worst.max_abs)} over a range of {num(worst.value_range)}).</p>"
        )
    if first is not None:
        body.append(
            f"<p>First failing layer: <code>{escape(first.name)}</code>; the error "
            "starts there and flows downstream.</p>"
        )
    body.append(_layer_chart(v.layers))
    return body
