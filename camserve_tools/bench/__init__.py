"""Measurement tools: the serving benchmark and its report, the handler profile, endurance runs, the load test driver."""
