"""The HTML report investigators open after a query: per query, where and when the person was seen.

One self-contained HTML file (inline CSS, no scripts, no network) plus a sibling folder
``<name>_files/`` of JPEGs (indexers/report_images.py), so it opens in any browser and can be
zipped and mailed. With several queries the page starts with an index (one link per query, with
its sightings and cameras) and every section links back to it. Per query:

- the query crop, its file (path on hover, link to the file where it is local), camera and label;
- a timeline (indexers/report_timeline.py): one lane per camera, each *sighting* on a time axis,
  its details on hover, a click jumps to its card;
- the sightings — hits accepted by the trajectory rule (indexers/trajectory.py: rank ≤ N and
  distance ≤ τ), in time order — each with its crop and its full frame with the box drawn, time,
  camera, rank, distance and file (hover, click);
- the top-N ranked hits as crops, green/red borders when labels say same/other person.

Text never overlaps: every caption is in normal flow with a fixed width and wraps anywhere
(long file names included); the timeline places its own text (see there).
``tests/test_report_browser.py`` checks this in a real headless Chromium.

The thumbnail folder is the only thing reidx writes beside the report, and it never deletes
what it did not create: a folder it creates gets a marker file; a later report reuses only a
real folder carrying that marker (replacing its own thumbnails, nothing else); an existing
folder without the marker, or a symbolic link, is refused (it once deleted a user's folder).
"""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc

from reidx.indexers.report_images import Wanted, make_pictures, split_path
from reidx.indexers.report_timeline import timeline_svg
from reidx.indexers.trajectory import DEFAULT_DISTANCE_MAX, DEFAULT_RANK_MAX, accepted, sighting_order
from reidx.pipeline.atomic import write_text_atomic

FOLDER_MARKER = ".reidx-report"  # written into every thumbnail folder reidx creates
MAX_SIGHTINGS = 40  # sighting cards per query (the closest; the timeline shows them all)


class ReportFolderError(ValueError):
    """The thumbnail folder beside the report exists and is not one reidx created."""


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.2em 1.5em;
max-width:1120px;color:#1f2328;background:#fff}
h1{font-size:1.4em;margin:.2em 0} h2{font-size:1.15em;margin:0 0 .3em} h3{font-size:1em;margin:1em 0 .4em}
a{color:#0b57d0} .meta{color:#57606a;font-size:13px;margin:.2em 0}
nav.index{border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;margin:1em 0}
nav.index ol{margin:.3em 0;padding-left:1.6em;columns:2 380px;column-gap:2em}
nav.index li{break-inside:avoid;margin:.15em 0;overflow-wrap:anywhere}
section.query{border-top:2px solid #d0d7de;padding:1em 0 1.5em}
.qhead{display:flex;gap:1em;align-items:flex-start}
.qhead img{height:128px;border:3px solid #57606a;background:#eee;flex:none}
.qinfo{min-width:0;flex:1;overflow-wrap:anywhere}
.legend{font-size:13px;color:#57606a;margin:.2em 0 .4em}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin:0 .25em 0 .8em;vertical-align:middle}
.timeline{display:block;max-width:100%;height:auto;border:1px solid #eaeef2;border-radius:4px}
.timeline .lane{stroke:#eaeef2;stroke-width:1} .timeline .axis,.timeline .tick{stroke:#57606a;stroke-width:1}
.timeline .path{fill:none;stroke:#8c959f;stroke-width:1.2;stroke-dasharray:3 3}
.timeline text{font:12px system-ui,sans-serif;fill:#1f2328}
.timeline circle{stroke:#fff;stroke-width:1.5}
.sightings{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:.8em}
.sighting{display:flex;gap:.6em;border:1px solid #d0d7de;border-radius:6px;padding:.5em;min-width:0}
.sighting:target{outline:3px solid #0b57d0}
.pics{display:flex;gap:.4em;flex:none;align-items:flex-start}
.pics img{display:block;background:#eee}
.crop{height:128px;width:auto;border:3px solid #bbb}
.frame{width:240px;height:auto;border:1px solid #8c959f}
.noframe{display:flex;width:120px;height:128px;align-items:center;justify-content:center;text-align:center;
font-size:12px;color:#57606a;border:1px dashed #bbb;padding:.3em}
.facts{min-width:0;flex:1;font-size:13px;overflow-wrap:anywhere}
.facts p{margin:0 0 .25em} .when{font-weight:600}
.hits{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:118px;font-size:12px;text-align:center;overflow-wrap:anywhere}
figure img{height:128px;max-width:112px;object-fit:contain;border:4px solid #bbb;background:#eee;display:block;
margin:0 auto}
.match img,img.match{border-color:#1a9e3a} .nomatch img,img.nomatch{border-color:#d33}
.missing{display:flex;height:128px;width:72px;margin:0 auto;border:3px dashed #bbb;align-items:center;
justify-content:center;font-size:11px}
figcaption{margin-top:.2em}
.none{color:#57606a;font-style:italic}
"""


def _is_thumbnail(path: Path) -> bool:
    return path.suffix == ".jpg" and path.name.startswith(("q-", "g-", "f-"))


def _thumbnail_folder(folder: Path) -> Path:
    """``folder`` ready for this report's thumbnails: created (with the marker), or one reidx created before."""
    if folder.is_symlink():
        raise ReportFolderError(f"{folder} is a symbolic link, not a folder reidx created: remove it or "
                                f"choose another --report path")
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / FOLDER_MARKER).write_text("thumbnails of a reidx report; reidx replaces its q-*/g-*/f-* files here\n")
        return folder
    marker = folder / FOLDER_MARKER
    if not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        raise ReportFolderError(f"{folder} exists and was not created by reidx: move it away or choose "
                                f"another --report path")
    for old in folder.iterdir():  # the last report's thumbnails only; anything else stays
        if _is_thumbnail(old) and not old.is_symlink() and old.is_file():
            old.unlink()
    return folder


def _box(row: dict, prefix: str = "") -> tuple | None:
    values = [row.get(f"{prefix}{c}") for c in ("x1", "y1", "x2", "y2")]
    return None if any(v is None for v in values) else tuple(values)


def _when(row: dict) -> str:
    t = row.get("timestamp")
    if t is None:
        return "time unknown"
    return t.isoformat(sep=" ", timespec="milliseconds" if t.microsecond else "seconds")


def _file_link(path: str, text: str) -> str:
    """The file's name, its full path on hover, and a link to open it where it is a local file."""
    title = html.escape(path)
    if "::" in path or not os.path.isabs(path):
        return f'<span title="{title}">{html.escape(text)}</span>'
    return f'<a href="file://{quote(path)}" title="{title}">{html.escape(text)}</a>'


class _Page:
    """The pictures one report needs, named once, and the HTML that shows them."""

    def __init__(self, folder: Path, uri_of: dict):
        self.folder, self.uri_of = folder, uri_of
        self.wanted: dict[tuple[str, str], list[Wanted]] = defaultdict(list)
        self.present: set[str] = set()
        self.whole: set[str] = set()
        self.reasons: dict[str, str] = {}  # name → why that picture is missing (shown on the page)
        self._is_dir: dict[str, bool] = {}

    def want(self, uri: str | None, member: str, name: str, box, kind: str = "crop",
             frame_index: int | None = None) -> None:
        if uri is not None and not any(w.name == name for w in self.wanted[(uri, member)]):
            self.wanted[(uri, member)].append(Wanted(name, box, kind, frame_index))

    def want_hit(self, hit: dict, *kinds: str) -> None:
        """A gallery hit's crop (g-) and/or frame (f-): from its image, or its video's frame."""
        for kind in kinds:
            name = f"{'f' if kind == 'frame' else 'g'}-{hit['detection_id']}.jpg"
            uri = self.uri_of.get(hit["detection_id"])
            self.want(uri, hit["member"], name, _box(hit), kind, hit.get("frame_index"))

    def gallery_path(self, row: dict) -> str:
        uri = self.uri_of.get(row["detection_id"])
        if uri is None:
            return row["image_key"]
        if uri not in self._is_dir:
            self._is_dir[uri] = os.path.isdir(uri)
        return str(Path(uri) / row["member"]) if self._is_dir[uri] else f"{uri}::{row['member']}"

    def img(self, name: str, alt: str, css: str, title: str) -> str:
        if name not in self.present:
            why = self.reasons.get(name, "unreadable")
            return f'<span class="missing" title="{html.escape(title + ": " + why)}">unreadable</span>'
        return (f'<img class="{css}" src="{html.escape(self.folder.name)}/{html.escape(name)}" '
                f'alt="{html.escape(alt)}" title="{html.escape(title)}">')


def _css_of(query: dict, hit: dict) -> str:
    if query.get("query_person_id") is None or hit.get("person_id") is None:
        return ""
    return "match" if hit["person_id"] == query["query_person_id"] else "nomatch"


def _query_head(page: _Page, number: int, query: dict, qid: str) -> str:
    label = [f"camera {query['query_camera']}" if query.get("query_camera") is not None else
             ("cameras " + ", ".join(query.get("query_cameras") or []) if query.get("query_cameras") else "camera ?")]
    if query.get("query_person_id") is not None:
        label.append(f"id {query['query_person_id']}")
    if (query.get("query_members") or 1) > 1:
        label.append(f"{query['query_members']} images fused ({html.escape(query.get('query_group') or '')})")
    path = query["query_path"]
    return (f"<div class='qhead'>{page.img(f'q-{qid}.jpg', 'query', 'query', path)}<div class='qinfo'>"
            f"<h2>Query {number}</h2><p>{_file_link(path, Path(path.split('::')[-1]).name)}</p>"
            f"<p class='meta'>{' · '.join(html.escape(x) for x in label)}</p>"
            f"<p class='meta'><a href='#index'>↑ index</a></p></div></div>")


def _sighting_card(page: _Page, number: int, query: dict, hit: dict) -> str:
    path = page.gallery_path(hit)
    det = hit["detection_id"]
    crop = page.img(f"g-{det}.jpg", f"sighting #{hit['rank']}", "crop " + _css_of(query, hit), path)
    frame_name = f"f-{det}.jpg"
    why = ""
    if frame_name in page.present:
        frame = page.img(frame_name, f"frame of sighting #{hit['rank']}", "frame", path)
    else:
        text = "crop source: no larger frame" if frame_name in page.whole else "frame unreadable"
        frame = f'<span class="noframe">{text}</span>'
        why = "".join(f"<p class='meta'>{html.escape(r)}</p>" for r in dict.fromkeys(
            page.reasons[n] for n in (f"g-{det}.jpg", frame_name) if n in page.reasons))
    track = f" · track {html.escape(hit['track_id'])}" if hit.get("track_id") else ""
    at = f" · frame {hit['frame_index']}" if hit.get("frame_index") is not None else ""
    return (f"<article class='sighting' id='s-{number}-{hit['rank']}'><div class='pics'>{crop}{frame}</div>"
            f"<div class='facts'><p class='when'>cam {html.escape(str(hit.get('camera')))} · "
            f"{html.escape(_when(hit))}</p><p>#{hit['rank']} · distance {hit['cosine_distance']:.3f}{track}</p>"
            f"<p>{_file_link(path, hit['image_key'])}{at}</p>{why}</div></article>")


def _hit_figure(page: _Page, query: dict, hit: dict) -> str:
    path = page.gallery_path(hit)
    distance = f"{hit['cosine_distance']:.3f}"
    if hit.get("rerank_distance") is not None:
        distance += f" → {hit['rerank_distance']:.3f}"
    caption = (f"#{hit['rank']} d={distance}<br>cam {html.escape(str(hit.get('camera')))}"
               f"<br>{html.escape(_when(hit))}<br>{_file_link(path, Path(hit['member']).name)}")
    return (f"<figure class='{_css_of(query, hit)}'>" + page.img(f"g-{hit['detection_id']}.jpg", hit["image_key"],
                                                                 "", path) + f"<figcaption>{caption}</figcaption></figure>")


def write_report(results: pa.Table, items: pa.Table, out: str | os.PathLike, top_n: int = 10,
                 max_pixels: int = 50_000_000, title: str = "reidx query results",
                 rank_max: int = DEFAULT_RANK_MAX, distance_max: float = DEFAULT_DISTANCE_MAX) -> dict:
    """Write the report for ``results`` (query-results schema, indexers/results.py) to ``out``.

    ``items`` is the index's item table (for each detection's source uri). Sightings follow the
    trajectory rule (``rank_max``, ``distance_max``). Returns counts.
    """
    out = Path(out)
    folder = _thumbnail_folder(out.with_name(out.stem + "_files"))
    page = _Page(folder, dict(zip(items["detection_id"].to_pylist(), items["source_uri"].to_pylist())))
    shown = results.filter(pc.or_(pc.is_null(results["rank"]), pc.less_equal(results["rank"], top_n))).to_pylist()
    seen = defaultdict(list)
    for row in accepted(results, rank_max, distance_max).to_pylist():
        seen[row["query_id"]].append(row)
    queries: dict[str, dict] = {}
    hits: dict[str, list[dict]] = defaultdict(list)
    failed = [row for row in shown if row["status"] != "ok"]
    for row in shown:
        if row["status"] == "ok":
            queries.setdefault(row["query_id"], row)
            hits[row["query_id"]].append(row)
    for qid in seen:
        queries.setdefault(qid, seen[qid][0])
    cards: dict[str, list[dict]] = {}
    for qid, query in queries.items():
        page.want(*split_path(query["query_path"]), f"q-{qid}.jpg", _box(query, "query_"))
        for hit in hits[qid]:
            page.want_hit(hit, "crop")
        closest = sorted(seen[qid], key=lambda r: (r["cosine_distance"], r["rank"]))[:MAX_SIGHTINGS]
        cards[qid] = sighting_order(closest)
        for hit in cards[qid]:
            page.want_hit(hit, "crop", "frame")
    pictures = make_pictures(page.wanted, max_pixels)
    page.whole, page.reasons = pictures.whole, pictures.reasons
    for name, picture in pictures.made.items():
        if (folder / name).is_symlink():  # planted since: never write through a link
            raise ReportFolderError(f"{folder / name} is a symbolic link reidx did not create: remove it")
        picture.save(folder / name, quality=85)
    page.present = set(pictures.made)
    rerank = next((r["rerank"] for r in shown if r.get("rerank") not in (None, "none")), None)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<header id='index'><h1>{html.escape(title)}</h1><p class='meta'>{len(queries)} queries; sightings: "
             f"rank ≤ {rank_max} and distance ≤ {distance_max:g}; top {top_n} ranked hits shown each"
             + (f", re-ranked with {html.escape(rerank)}" if rerank else "") +
             "; green = same person id, red = another id (when labels exist). Hover for details, "
             "click a timeline dot for its sighting.</p></header>"]
    numbered = list(enumerate(queries.items(), 1))
    if len(numbered) > 1:
        parts.append("<nav class='index'><h2>Queries</h2><ol>")
        for number, (qid, query) in numbered:
            cameras = sorted({str(r.get("camera")) for r in seen[qid]})
            parts.append(f"<li><a href='#q-{number}'>Query {number}: "
                         f"{html.escape(Path(query['query_path'].split('::')[-1]).name)}</a> — {len(seen[qid])} "
                         f"sighting{'s' if len(seen[qid]) != 1 else ''}" +
                         (f" in camera{'s' if len(cameras) > 1 else ''} {html.escape(', '.join(cameras))}"
                          if cameras else "") + "</li>")
        parts.append("</ol></nav>")
    for number, (qid, query) in numbered:
        parts.append(f"<section class='query' id='q-{number}'>" + _query_head(page, number, query, qid))
        parts.append(f"<h3>Timeline: {len(seen[qid])} sightings</h3>")
        if seen[qid]:
            parts.append("<p class='legend'>one lane per camera; dashed line: the path in time order"
                         "<span class='dot' style='background:#1a9e3a'></span>same id"
                         "<span class='dot' style='background:#d33'></span>other id"
                         "<span class='dot' style='background:#2563eb'></span>no label</p>")
            parts.append(timeline_svg([{"camera": r.get("camera"), "timestamp": r.get("timestamp"), "rank": r["rank"],
                                        "cosine_distance": r["cosine_distance"], "path": page.gallery_path(r),
                                        "css": _css_of(query, r)} for r in seen[qid]], f"s-{number}"))
            more = len(seen[qid]) - len(cards[qid])
            parts.append("<h3>Sightings in time order" + (f" (the {len(cards[qid])} closest; {more} more on the "
                                                            f"timeline)" if more else "") + "</h3>")
            parts.append("<div class='sightings'>" + "".join(_sighting_card(page, number, query, hit)
                                                             for hit in cards[qid]) + "</div>")
        else:
            parts.append(f"<p class='none'>No hit has rank ≤ {rank_max} and distance ≤ {distance_max:g}.</p>")
        parts.append(f"<h3>Top {top_n} ranked hits</h3><div class='hits'>")
        parts += [_hit_figure(page, query, hit) for hit in hits[qid]]
        parts.append("</div></section>")
    if failed:
        parts.append("<section class='query'><h2>Images without a query person</h2><ul>")
        parts += [f"<li>{html.escape(r['query_path'])}: {html.escape(r['status'])}"
                  f"{': ' + html.escape(r['reason']) if r['reason'] else ''}</li>" for r in failed]
        parts.append("</ul></section>")
    parts.append("</body></html>")
    write_text_atomic(out, "\n".join(parts))
    wanted = {w.name for ws in page.wanted.values() for w in ws}
    return {"report": str(out), "thumbnails": len(page.present), "queries": len(queries),
            "sightings": sum(len(v) for v in seen.values()),
            "frames": sum(1 for n in page.present if n.startswith("f-")),
            "missing_thumbnails": len(wanted - page.present - page.whole),
            "missing_reasons": dict(Counter(page.reasons.values()))}
