"""reidx pipeline: image archives → person detections → ReID embeddings → Parquet shards."""
