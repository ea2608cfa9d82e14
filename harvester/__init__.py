"""harvester: async, concurrent, resumable harvesting of public medical-imaging archives."""
__version__ = "0.1.0"
