"""The TorchServe adapter: `handler.py` is the archive's handler, `batch.py` the state of a batch between its stages."""
