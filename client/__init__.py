"""Clients, a package per app: ``web/`` (the page: static files), ``speaker/`` (``voxlens
speaker``), ``desktop/`` (``voxlens desktop``), and ``common/``, the client library they, the
``voxlens talk`` command, the tests and the benchmarks share. Clients import ``streaming`` (the
wire protocol) and nothing server-side."""
