"""`ortllava bench --plot FILE.svg`: the benchmark report as a picture, written as plain SVG (no plotting library).

Two panels:
- where one answer's time goes, a stacked bar per contender: preprocessing, vision, the rest of the time to
  first token (prefill), and the decode steps. transformers' vision and prefill are one segment, because
  `generate` runs them in one call;
- decode ms/token per contender, with each ortllava precision's floor (the bytes a step reads over the
  memory bandwidth measured in the same run) drawn across its bar.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

WIDTH = 860
LABEL_WIDTH = 190  # the contenders' names, left of the bars
BAR_HEIGHT = 22
GAP = 10
COLOURS = {"preprocessing": "#8da0cb", "vision": "#66c2a5", "prefill": "#fc8d62", "vision + prefill": "#e5c494", "decode": "#a6d854"}


def _contenders(report: dict) -> list[tuple[str, dict, float | None]]:
    """(label, timings, floor ms or None) per ortllava precision, then transformers."""
    rows = []
    for name, run in report["precisions"].items():
        label = f"ortllava {name}" + (" + int8 cache" if run.get("kv_dtype") == "int8" else "")
        rows.append((label, run["ortllava"], run["decode_floor_ms"]))
    rows.append(("transformers", report["transformers"], None))
    return rows


def _segments(timings: dict) -> list[tuple[str, float]]:
    """One answer's time in ms, split as the panel shows it."""
    preprocess = timings["preprocess_s"] * 1000
    first_token = timings["time_to_first_token_s"] * 1000
    decode = (timings["total_s"] - timings["time_to_first_token_s"]) * 1000
    if timings.get("vision_s") is None:
        return [("preprocessing", preprocess), ("vision + prefill", first_token - preprocess), ("decode", decode)]
    vision = timings["vision_s"] * 1000
    return [("preprocessing", preprocess), ("vision", vision), ("prefill", first_token - preprocess - vision), ("decode", decode)]


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 12, weight: str = "normal") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}">{escape(text)}</text>'


def _rect(x: float, y: float, width: float, height: float, colour: str, title: str) -> str:
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 0):.1f}" height="{height}" fill="{colour}"><title>{escape(title)}</title></rect>'


def render_svg(report: dict) -> str:
    """The report (as `bench` returns it) -> an SVG document."""
    rows = _contenders(report)
    plot_width = WIDTH - LABEL_WIDTH - 170  # room for the figures right of the longest bar
    parts = []
    y = 28
    parts.append(_text(12, y, f"{report['model']} ({report['layers']} decoder layers), {report['provider']}, {report['threads']} threads", size=13, weight="bold"))
    y += 18
    parts.append(_text(12, y, f"{report['prompt_tokens']} prompt tokens, {report['new_tokens']} new tokens; medians of {report['repeats']} alternating runs"))

    # Panel 1: where one answer's time goes.
    y += 30
    parts.append(_text(12, y, "one answer, end to end (ms)", weight="bold"))
    y += 12
    longest = max(sum(ms for _, ms in _segments(timings)) for _, timings, _ in rows)
    scale = plot_width / longest if longest > 0 else 0.0
    for label, timings, _ in rows:
        parts.append(_text(LABEL_WIDTH - 8, y + BAR_HEIGHT * 0.7, label, anchor="end"))
        x = LABEL_WIDTH
        for segment, ms in _segments(timings):
            parts.append(_rect(x, y, ms * scale, BAR_HEIGHT, COLOURS[segment], f"{segment}: {ms:.1f} ms"))
            x += max(ms, 0) * scale
        parts.append(_text(x + 6, y + BAR_HEIGHT * 0.7, f"{timings['total_s'] * 1000:.0f}"))
        y += BAR_HEIGHT + GAP
    x = LABEL_WIDTH
    for segment, colour in COLOURS.items():
        parts.append(_rect(x, y, 12, 12, colour, segment))
        parts.append(_text(x + 16, y + 10, segment, size=11))
        x += 22 + 7 * len(segment)
    y += 36

    # Panel 2: decode speed against the floor.
    parts.append(_text(12, y, f"decode (ms/token); black line: the floor at {report['bandwidth_gb_s']:.1f} GB/s measured", weight="bold"))
    y += 12
    longest = max(timings["decode_ms_per_token"] for _, timings, _ in rows)
    scale = plot_width / longest if longest > 0 else 0.0  # (a report of one new token has no decode time: no bars)
    for label, timings, floor in rows:
        ms = timings["decode_ms_per_token"]
        parts.append(_text(LABEL_WIDTH - 8, y + BAR_HEIGHT * 0.7, label, anchor="end"))
        parts.append(_rect(LABEL_WIDTH, y, ms * scale, BAR_HEIGHT, COLOURS["decode"], f"{ms:.2f} ms/token"))
        note = f"{ms:.2f}"
        if floor:
            x = LABEL_WIDTH + floor * scale
            parts.append(f'<line x1="{x:.1f}" y1="{y - 3}" x2="{x:.1f}" y2="{y + BAR_HEIGHT + 3}" stroke="black" stroke-width="2"><title>floor {floor:.2f} ms</title></line>')
            note += f"  ({ms / floor:.2f}x the floor)"
        parts.append(_text(LABEL_WIDTH + ms * scale + 6, y + BAR_HEIGHT * 0.7, note))
        y += BAR_HEIGHT + GAP
    height = y + 10
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def write_svg(report: dict, path: Path) -> None:
    Path(path).write_text(render_svg(report))
