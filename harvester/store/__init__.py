"""The store: where verified bytes land and how they are read back: layout, the streaming sink,
state, the manifest (harvest.json) and the tree operations."""
