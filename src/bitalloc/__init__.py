"""bitalloc."""
