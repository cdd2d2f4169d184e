"""Imported first by every benchmark: a Prefect home of its own (an ephemeral server in a
temporary folder), quiet logs and no telemetry. Benchmarks that move DICOM between the demo's
Orthancs also set TCP_NODELAY themselves."""

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
