"""Plain-torch models (no I/O) and safe weight loading."""
