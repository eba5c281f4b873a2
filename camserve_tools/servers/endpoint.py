"""What every launcher of a local server shares: where it listens and where it keeps its run."""

from __future__ import annotations

from pathlib import Path


class LocalEndpoint:
    """A server on `host`:`inference_port` whose logs, temp files and pid records live in `run_dir`. The dataclasses
    that launch each engine declare these fields; the addresses derived from them are spelled once, here."""

    run_dir: Path
    host: str
    inference_port: int

    @property
    def inference_url(self) -> str:
        """Where clients send predictions and explanations."""
        return f"http://{self.host}:{self.inference_port}"

    @property
    def log_dir(self) -> Path:
        """The server's own logs, read back when it does not come up."""
        return self.run_dir / "logs"
