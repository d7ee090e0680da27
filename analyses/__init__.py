"""llama-scalpel analyses (placeholder, filled below)."""
