"""Asking the gallery: query and export."""

from __future__ import annotations

import time

import click

from reidx.commands.common import (_emit, _out, _progress, backend_option, device_option, gpu_option, json_option,
                                   max_pixels_option, rerank_options)


@click.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@_out(".parquet", help="Ranked results (Parquet).")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write an HTML report (+ a _files/ folder).")
@click.option("--report-top", type=click.IntRange(1), default=10, show_default=True,
              help="Gallery crops per query in the report.")
@click.option("--top-k", type=click.IntRange(1), default=100, show_default=True,
              help="Ranked gallery detections per query.")
@click.option("--detect", is_flag=True, help="Queries are full frames: every detected person becomes a query.")
@click.option("--largest", is_flag=True, help="With --detect: only the largest person of each frame.")
@click.option("--group-by", "group_by", metavar="KEYS",
              help="Search several images of one person as one query: person_id, camera, folder (one folder per "
                   "person) or input (one QUERY argument per person), or several joined by commas.")
@click.option("--fuse", "fusion", type=click.Choice(["mean", "min"]), default="mean", show_default=True,
              help="With --group-by: mean = the members' mean vector, renormalised; min = best-of (each gallery "
                   "item's smallest distance to any member).")
@click.option("--since", help="Only gallery detections at or after this time (ISO 8601, cameras' local time).")
@click.option("--until", help="Only gallery detections at or before this time (ISO 8601).")
@click.option("--camera", "cameras", multiple=True, help="Only gallery detections of this camera (repeatable).")
@click.option("--exclude-same-camera", is_flag=True,
              help="Leave out gallery detections from the query's own camera(s).")
@click.option("--exclude-self", is_flag=True,
              help="Leave out gallery detections from the query's own image (the query itself, when indexed).")
@click.option("--min-score", type=click.FloatRange(0, 1), help="Only gallery detections with at least this "
                                                               "detection score (crops have 1.0).")
@click.option("--trajectory", is_flag=True,
              help="Also write each query's sightings as a time-ordered path: OUT's name + .trajectory.parquet.")
@click.option("--accept-rank", type=click.IntRange(1), default=200, show_default=True,
              help="Sighting rule (trajectory and report): rank at most this ...")
@click.option("--accept-distance", type=click.FloatRange(0, 2), default=0.08, show_default=True,
              help="... and cosine distance at most this (chosen on Con-ReID's training identities for "
                   "osnet_x0_25_msmt17; see docs/query.md).")
@rerank_options
@click.option("--candidates", type=click.IntRange(1), default=400, show_default=True,
              help="With --rerank: each query's top candidates that are re-ranked (then cut to --top-k). Fewer "
                   "is faster; on Con-ReID 100 lost up to 1.2 mAP against exact re-ranking, 400 at most 0.18.")
@click.option("--nprobe", type=click.IntRange(1), help="Search breadth: IVF lists probed, or efSearch of an hnsw index "
                                                                "[default: the calibrated one].")
@click.option("--workers", type=click.IntRange(1),
              help="Search on a local Dask cluster of this many worker processes, each mapping the index "
                   "(for many queries; same results) [default: in this process]. Filtered searches stay here.")
@click.option("--scheduler", help="Address of an existing Dask scheduler to search on (workers must see the "
                                  "gallery at the same path).")
@click.option("--metrics", "score", is_flag=True,
              help="Also report mAP/rank-k/mINP from the labels (Market-1501 names or manifest labels); only "
                   "meaningful when queries and gallery share one label space.")
@click.option("--weights", "-w", help="Check the gallery was embedded with these weights [default: the gallery's own].")
@backend_option
@device_option
@gpu_option
@max_pixels_option
@json_option
def query(gallery, queries, out, report, report_top, top_k, detect, largest, group_by, fusion, since, until, cameras,
          exclude_same_camera, exclude_self, min_score, trajectory, accept_rank, accept_distance, rerank,
          rerank_preset, k1, k2, lambda_value, candidates, nprobe, workers, scheduler, score, weights, backend, device, gpu, max_pixels,
          as_json):
    """Find where the people in QUERIES appear in GALLERY.

    QUERIES are crop images, folders, globs or manifests (.toml). Each person is embedded with
    the gallery's own embedder and searched in its index; OUT gets one row per (query, rank)
    (schema: docs/schemas.md). An image where nothing is detected gets a status row. Filters
    (--since/--until/--camera/--exclude-same-camera/--exclude-self/--min-score) are applied
    inside the search: every query still gets its --top-k best among what passes. When
    queries and gallery share labels (Market-1501 names or manifest labels), --metrics reports
    mAP/rank-k (matches beyond --top-k count as missed). Example:

      reidx query out/gallery crops/ --out results.parquet --report results.html --trajectory
    """
    if largest and not detect:
        raise click.UsageError("--largest needs --detect")
    if workers and scheduler:
        raise click.UsageError("--scheduler and --workers exclude each other")
    if report is not None and not report.lower().endswith((".html", ".htm")):
        raise click.UsageError(f"--report {report!r} must end with .html")
    from reidx.indexers.filters import SearchFilter, parse_time
    from reidx.indexers.query import run_query
    from reidx.indexers.query_groups import parse_group_by
    from reidx.indexers.rerank import params_from_options

    try:
        keys = parse_group_by(group_by)
        search_filter = SearchFilter(since=parse_time(since, "--since"), until=parse_time(until, "--until"),
                                     cameras=tuple(cameras), exclude_same_camera=exclude_same_camera,
                                     exclude_self=exclude_self, min_score=min_score)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    params = params_from_options(rerank, preset=rerank_preset, k1=k1, k2=k2, lambda_value=lambda_value)
    summary = run_query(gallery, list(queries), out, top_k=top_k, detect=detect, largest=largest, rerank=rerank,
                        rerank_params=params, candidates=candidates, nprobe=nprobe, weights=weights,
                        backend=backend, device=device, gpu=gpu, max_pixels=max_pixels, progress=_progress(),
                        score=score, search_filter=search_filter, group_by=keys, fusion=fusion,
                        cluster={"workers": workers, "scheduler": scheduler} if workers or scheduler else None)
    if trajectory or report:
        import pyarrow.parquet as pq

        results = pq.read_table(out)
    if trajectory:
        from reidx.indexers.trajectory import trajectory_path, write_trajectories

        summary["trajectory"] = write_trajectories(results, trajectory_path(out), accept_rank, accept_distance)
    if report:
        from reidx.indexers.report import write_report
        from reidx.indexers.versions import load_index

        summary["report"] = write_report(results, load_index(gallery, gpu="off").items, report, top_n=report_top,
                                         max_pixels=max_pixels, rank_max=accept_rank, distance_max=accept_distance)

    def text(r):
        groups = f" in {r['query_groups']} groups" if "query_groups" in r else ""
        yield f"{r['query_persons']} query persons{groups} → {r['rows']} rows in {out} ({r['wall_s']} s)"
        if r["images_without_person"] or r["images_failed"]:
            yield f"  {r['images_without_person']} images without a person, {r['images_failed']} failed"
        if "metrics" in r:
            m = r["metrics"]
            yield (f"  labelled: mAP {m['mAP']:.2f}%, rank-1 {m['rank1']:.2f}% over {m['queries']} queries "
                   f"(top-{r['top_k']} lists)")
        if "trajectory" in r:
            t = r["trajectory"]
            yield f"  trajectory: {t['sightings']} sightings in {t['segments']} segments → {t['out']}"
        if report:
            yield f"  report: {report}"
    _emit(summary, as_json, text)


@click.command()
@click.argument("gallery", type=click.Path(exists=True, file_okay=False))
@_out(".parquet", help="Output Parquet file.")
@click.option("--where", "where",
              help="Row filter: one SQL (DuckDB) boolean expression, e.g. \"camera = '3' AND score > 0.5\".")
@click.option("--columns", help="Comma-separated columns to keep [default: all but the embedding].")
@click.option("--with-embeddings", is_flag=True, help="Keep the embedding column.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Stop a --where filter that runs longer than this many seconds.")
@json_option
def export(gallery, out, where, columns, with_embeddings, timeout, as_json):
    """Export GALLERY's detections (committed shards) with their metadata to one Parquet file."""
    from reidx.indexers.export import export_detections

    started = time.perf_counter()
    summary = export_detections(gallery, out, where=where, columns=columns.split(",") if columns else None,
                                with_embeddings=with_embeddings, timeout=timeout)
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    _emit(summary, as_json, lambda r: [f"{r['persons']} detections → {out}"])
