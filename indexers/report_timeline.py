"""A query's sightings as an inline SVG timeline: one lane per camera, sightings on a time axis.

Why SVG and no script: the report is one self-contained file that opens anywhere (no network,
nothing to execute), and SVG gives hover text (``<title>``) and click targets (``<a href>`` to
the sighting's card) for free. Text never overlaps by construction: lane labels sit in their own
lanes in a left gutter (cut to LABEL_CHARS, the full name on hover), tick labels are at least
TICK_MIN_PX apart, and sightings without a time get their own column right of the axis.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timedelta

WIDTH = 960
GUTTER = 96  # lane labels
UNKNOWN_COLUMN = 110  # sightings without a time
LANE = 30
AXIS = 34
TICK_MIN_PX = 110
LABEL_CHARS = 11
STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
           172800, 604800)
COLOURS = {"match": "#1a9e3a", "nomatch": "#d33", "": "#2563eb"}


def _camera_key(camera) -> tuple:
    text = "" if camera is None else str(camera)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _ticks(start: datetime, end: datetime, plot_px: float) -> tuple[list[datetime], str]:
    """Round tick times between start and end at least TICK_MIN_PX apart, and their label format."""
    span = max((end - start).total_seconds(), 1e-3)
    step = next((s for s in STEPS_S if plot_px * s / span >= TICK_MIN_PX), STEPS_S[-1])
    epoch = datetime(start.year, start.month, start.day)
    first = epoch + timedelta(seconds=math.ceil((start - epoch).total_seconds() / step) * step)
    ticks, t = [], first
    while t <= end:
        ticks.append(t)
        t += timedelta(seconds=step)
    fmt = "%H:%M:%S" if step < 60 else "%H:%M"
    if start.date() != end.date():
        fmt = "%m-%d %H:%M" if step < 86400 else "%Y-%m-%d"
    return ticks, fmt


def timeline_svg(sightings: list[dict], anchor: str) -> str:
    """``sightings``: dicts with camera, timestamp (datetime or None), rank, cosine_distance,
    path, css (match | nomatch | ""). ``anchor``: the prefix of the sighting cards' ids."""
    if not sightings:
        return ""
    cameras = sorted({s["camera"] for s in sightings}, key=_camera_key)
    lane_of = {camera: i for i, camera in enumerate(cameras)}
    timed = [s for s in sightings if s["timestamp"] is not None]
    untimed = [s for s in sightings if s["timestamp"] is None]
    plot_left, plot_right = GUTTER + 12, WIDTH - 16 - (UNKNOWN_COLUMN if untimed else 0)
    height = 8 + LANE * len(cameras) + AXIS + 16
    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="sightings by camera and time">']
    for camera, lane in lane_of.items():
        y = 8 + lane * LANE + LANE / 2
        name = "camera ?" if camera is None else str(camera)
        label = name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"
        parts.append(f'<line class="lane" x1="{plot_left}" x2="{WIDTH - 8}" y1="{y}" y2="{y}"/>'
                     f'<text class="lane-label" x="{GUTTER}" y="{y + 4}" text-anchor="end">'
                     f'<title>{html.escape(name)}</title>cam {html.escape(label)}</text>')
    axis_y = 8 + LANE * len(cameras) + 6
    if timed:
        parts.append(f'<line class="axis" x1="{plot_left}" x2="{plot_right}" y1="{axis_y}" y2="{axis_y}"/>')
    points: list[tuple[float, float, dict]] = []
    if timed:
        start, end = min(s["timestamp"] for s in timed), max(s["timestamp"] for s in timed)
        if end == start:
            start, end = start - timedelta(seconds=30), end + timedelta(seconds=30)
        pad = (end - start) * 0.04
        start, end = start - pad, end + pad
        span = (end - start).total_seconds()

        def x_of(t: datetime) -> float:
            return plot_left + (plot_right - plot_left) * (t - start).total_seconds() / span

        ticks, fmt = _ticks(start, end, plot_right - plot_left)
        for tick in ticks:
            x = x_of(tick)
            parts.append(f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 5}"/>'
                         f'<text class="tick-label" x="{x:.1f}" y="{axis_y + 18}" text-anchor="middle">'
                         f'{tick.strftime(fmt)}</text>')
        if "%m" not in fmt and "%Y" not in fmt:
            parts.append(f'<text class="tick-label" x="{plot_left}" y="{axis_y + 32}">{start.date().isoformat()}</text>')
        for s in sorted(timed, key=lambda s: s["timestamp"]):
            points.append((x_of(s["timestamp"]), 8 + lane_of[s["camera"]] * LANE + LANE / 2, s))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        parts.append(f'<polyline class="path" points="{path}"/>')
    if untimed:  # a column of their own; the whole width when no sighting has a time
        left, right = (WIDTH - 8 - UNKNOWN_COLUMN, WIDTH - 8) if timed else (plot_left, WIDTH - 8)
        label = "time unknown" if timed else "no sighting has a time: one dot per sighting, by rank"
        parts.append(f'<text class="tick-label" x="{(left + right) / 2:.1f}" y="{axis_y + 18}" '
                     f'text-anchor="middle">{label}</text>')
        per_lane: dict = {}
        for s in sorted(untimed, key=lambda s: s["rank"]):
            i = per_lane[s["camera"]] = per_lane.get(s["camera"], -1) + 1
            x = left + 10 + (i * 14) % max(14, right - left - 20)
            points.append((x, 8 + lane_of[s["camera"]] * LANE + LANE / 2, s))
    for x, y, s in points:
        when = s["timestamp"].isoformat(sep=" ", timespec="milliseconds") if s["timestamp"] else "time unknown"
        tip = f"#{s['rank']} · cam {s['camera']} · {when} · d={s['cosine_distance']:.3f}\n{s['path']}"
        parts.append(f'<a href="#{html.escape(anchor)}-{s["rank"]}"><circle cx="{x:.1f}" cy="{y:.1f}" r="6" '
                     f'fill="{COLOURS[s["css"]]}"><title>{html.escape(tip)}</title></circle></a>')
    parts.append("</svg>")
    return "".join(parts)
