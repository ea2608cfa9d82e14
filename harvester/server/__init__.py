"""The NBIA-compatible archive server: ``harvester serve``, ``harvester demo`` and the tests.

One concept per module, data flowing downwards::

    archive.py    Archive / SeriesRecord / InstanceRecord, indexed queries; backend (a) load_harvest_dir
    synthetic.py  backend (b): SyntheticSpec, build_synthetic (cached, deterministic)
      dicomgen.py   deterministic DICOM files with pydicom 2.4 / 3.x
      hostile.py    the HOSTILE collection (path attacks, symlink, zip bomb, ...)
    zipstream.py  streaming STORED ZIP writer (constant memory, CRC/sizes in local headers)
    deflatecache.py  each file's DEFLATED stream computed once (memory LRU by bytes, disk files)
    faults.py     FaultSpec, reproducible FaultInjector, TokenBucket bandwidth caps
    auth.py       ServerAuth and the OAuth2 token issuer
    stats.py      request statistics
    app.py        make_app: the aiohttp application (v1/v2/v4 endpoints, token, stats)
    serve.py      start_server, add_serve_arguments / run_serve (the CLI sub-command)
    testing.py    serve_in_thread for tests and notebooks

Nothing here is imported eagerly: ``import harvester.server`` costs nothing.
"""
