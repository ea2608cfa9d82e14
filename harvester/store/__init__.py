"""The store: where verified bytes land (layout, sink, state, manifest)."""
