"""reidx indexers: metrics, Faiss index, search, re-ranking and export over embedded galleries."""
