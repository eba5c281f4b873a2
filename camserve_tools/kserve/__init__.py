"""KServe: the storage bundle its TorchServe runtime reads (bundle.py), and a loopback copy of its pod (front.py, local.py)."""
