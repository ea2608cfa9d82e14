"""What a harvest leaves on disk and how it is read back: the manifest (harvest.json) now;
layout, state and the tree operations follow it here."""
