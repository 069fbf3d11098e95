"""Batch scoring jobs: durable store (store.py), input sources (sources.py), result rows (rows.py)
and the background runner that feeds the batcher's low-priority lane (runner.py).

Everything here is torch-free; the HTTP side lives in service/routes/jobs.py.
"""
