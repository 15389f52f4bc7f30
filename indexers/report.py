"""The HTML report of a query run: each query's crop beside its top-N gallery crops.

One self-contained HTML file (inline CSS, no scripts, no network) plus a sibling folder
``<name>_files/`` of JPEG thumbnails cut from the source frames at their boxes, so the report
opens in any browser and can be zipped and mailed. Matches are marked true/false (green/red)
when both the query and the gallery detection carry a person id.

The thumbnail folder is the only thing reidx writes beside the report, and it never deletes
what it did not create: a folder it creates gets a marker file; a later report reuses only a
real folder carrying that marker (replacing its own thumbnails, nothing else); an existing
folder without the marker, or a symbolic link, is refused (it once deleted a user's folder).
"""

from __future__ import annotations

import html
import os
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from reidx.pipeline.atomic import write_text_atomic
from reidx.pipeline.imaging import ImageDecodeError, decode_image
from reidx.pipeline.manifest import Source
from reidx.pipeline.sources import read_members

THUMB_HEIGHT = 128
FOLDER_MARKER = ".reidx-report"  # written into every thumbnail folder reidx creates


class ReportFolderError(ValueError):
    """The thumbnail folder beside the report exists and is not one reidx created."""

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} .meta{color:#555;font-size:.85em}
section{border-top:1px solid #ccc;padding:.8em 0;display:flex;gap:1.2em;align-items:flex-start}
.query{min-width:150px;max-width:190px;word-break:break-all}
.hits{display:flex;flex-wrap:wrap;gap:.5em}
figure{margin:0;text-align:center;font-size:.72em;width:100px}
figure img{height:128px;max-width:100px;object-fit:contain;border:4px solid #bbb;background:#eee}
figure.match img{border-color:#2a2} figure.nomatch img{border-color:#d33}
.missing{display:inline-block;height:128px;width:64px;border:4px dashed #bbb;line-height:128px}
"""


def _split_path(path: str) -> tuple[str, str]:
    """``uri::member`` (archives, URLs) or a plain file path → (uri of a source, member)."""
    if "::" in path:
        uri, member = path.split("::", 1)
        return uri, member
    return str(Path(path).parent), Path(path).name


def _read_images(wanted: dict[tuple[str, str], list[tuple[str, tuple]]], max_pixels: int) -> dict[str, Image.Image]:
    """Cut every wanted box: {(uri, member): [(thumb name, box)]} → {thumb name: thumbnail}.
    Each source is opened once (a .tar.gz is read in one pass); unreadable images are skipped."""
    by_uri: dict[str, list[str]] = defaultdict(list)
    for uri, member in wanted:
        by_uri[uri].append(member)
    thumbs: dict[str, Image.Image] = {}
    for uri, members in by_uri.items():
        source = Source(name="report", uri=uri, kind="crops")
        for member, data, error in read_members(source, sorted(set(members))):
            if error is not None:
                continue
            try:
                image = decode_image(data, max_pixels=max_pixels)
            except ImageDecodeError:
                continue
            for name, box in wanted[(uri, member)]:
                crop = image.crop(tuple(int(round(v)) for v in box)) if box is not None else image
                if crop.width < 1 or crop.height < 1:
                    continue
                scale = THUMB_HEIGHT / crop.height
                thumbs[name] = crop.resize((max(1, round(crop.width * scale)), THUMB_HEIGHT), Image.BILINEAR)
    return thumbs


def _box(row: dict, prefix: str = "") -> tuple | None:
    values = [row.get(f"{prefix}{c}") for c in ("x1", "y1", "x2", "y2")]
    return None if any(v is None for v in values) else tuple(values)


def _img(folder: str, name: str, present: set[str], alt: str) -> str:
    if name not in present:
        return '<span class="missing">unreadable</span>'
    return f'<img src="{html.escape(folder)}/{html.escape(name)}" alt="{html.escape(alt)}" loading="lazy">'


def _is_thumbnail(path: Path) -> bool:
    return path.suffix == ".jpg" and path.name.startswith(("q-", "g-"))


def _thumbnail_folder(folder: Path) -> Path:
    """``folder`` ready for this report's thumbnails: created (with the marker), or one reidx created before."""
    if folder.is_symlink():
        raise ReportFolderError(f"{folder} is a symbolic link, not a folder reidx created: remove it or "
                                f"choose another --report path")
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / FOLDER_MARKER).write_text("thumbnails of a reidx report; reidx replaces its q-*/g-* files here\n")
        return folder
    marker = folder / FOLDER_MARKER
    if not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        raise ReportFolderError(f"{folder} exists and was not created by reidx: move it away or choose "
                                f"another --report path")
    for old in folder.iterdir():  # the last report's thumbnails only; anything else stays
        if _is_thumbnail(old) and not old.is_symlink() and old.is_file():
            old.unlink()
    return folder


def write_report(results: pa.Table, items: pa.Table, out: str | os.PathLike, top_n: int = 10,
                 max_pixels: int = 50_000_000, title: str = "reidx query results") -> dict:
    """Write the report for ``results`` (query-results schema, indexers/query.py) to ``out``.

    ``items`` is the index's item table (for each detection's source uri). Returns counts.
    """
    out = Path(out)
    folder = _thumbnail_folder(out.with_name(out.stem + "_files"))
    shown = results.filter(pc.or_(pc.is_null(results["rank"]), pc.less_equal(results["rank"], top_n)))
    rows = shown.to_pylist()
    uri_of = dict(zip(items["detection_id"].to_pylist(), items["source_uri"].to_pylist()))
    wanted: dict[tuple[str, str], list] = defaultdict(list)
    queries: dict[str, dict] = {}
    hits: dict[str, list[dict]] = defaultdict(list)
    failed: list[dict] = []
    for row in rows:
        if row["status"] != "ok":
            failed.append(row)
            continue
        qid = row["query_id"]
        if qid not in queries:
            queries[qid] = row
            wanted[_split_path(row["query_path"])].append((f"q-{qid}.jpg", _box(row, "query_")))
        hits[qid].append(row)
        uri = uri_of.get(row["detection_id"])
        if uri is not None:
            wanted[(uri, row["member"])].append((f"g-{row['detection_id']}.jpg", _box(row)))
    thumbs = _read_images(wanted, max_pixels)
    for name, thumb in thumbs.items():
        if (folder / name).is_symlink():  # planted since: never write through a link
            raise ReportFolderError(f"{folder / name} is a symbolic link reidx did not create: remove it")
        thumb.save(folder / name, quality=88)
    present = set(thumbs)
    rerank = next((r["rerank"] for r in rows if r.get("rerank") not in (None, "none")), None)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='meta'>{len(queries)} query persons, top {top_n} shown each"
             + (f", re-ranked with {html.escape(rerank)}" if rerank else "") +
             "; green = same person id, red = another id (when labels exist).</p>"]
    for qid, q in queries.items():
        label = f"id {q['query_person_id']}" if q["query_person_id"] is not None else ""
        parts.append("<section><div class='query'>" + _img(folder.name, f"q-{qid}.jpg", present, "query") +
                     f"<div class='meta'>{html.escape(q['query_path'])}<br>camera {html.escape(str(q['query_camera']))}"
                     f" {html.escape(label)}</div></div><div class='hits'>")
        for hit in hits[qid]:
            css = ""
            if q["query_person_id"] is not None and hit["person_id"] is not None:
                css = "match" if hit["person_id"] == q["query_person_id"] else "nomatch"
            distance = f"{hit['cosine_distance']:.3f}"
            if hit.get("rerank_distance") is not None:
                distance += f" → {hit['rerank_distance']:.3f}"
            when = hit["timestamp"].isoformat(sep=" ") if hit.get("timestamp") else ""
            caption = (f"#{hit['rank']} d={distance}<br>cam {html.escape(str(hit['camera']))} {html.escape(when)}"
                       f"<br>{html.escape(hit['image_key'])}")
            parts.append(f"<figure class='{css}'>" + _img(folder.name, f"g-{hit['detection_id']}.jpg", present,
                                                          hit["image_key"]) + f"<figcaption>{caption}</figcaption></figure>")
        parts.append("</div></section>")
    if failed:
        parts.append("<h2>Images without a query person</h2><ul>")
        parts += [f"<li>{html.escape(r['query_path'])}: {html.escape(r['status'])}"
                  f"{': ' + html.escape(r['reason']) if r['reason'] else ''}</li>" for r in failed]
        parts.append("</ul>")
    parts.append("</body></html>")
    write_text_atomic(out, "\n".join(parts))
    return {"report": str(out), "thumbnails": len(present), "queries": len(queries),
            "missing_thumbnails": len({name for v in wanted.values() for name, _ in v} - present)}
