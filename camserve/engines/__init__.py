"""Engine adapters: each hosts camserve.pipeline in one serving engine, and only its own adapter imports that engine."""
