"""Ready means answering: every launcher waits until each of its models answers a real prediction.

A health route proves nothing here: a worker that cannot import its handler leaves TorchServe's /ping healthy while
every request to it hangs. So each launcher names what to ask (a route per model) and how to tell that its server
can no longer get there (it exited, a worker died), and waits here until every one answered 200.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import requests

# Pause between rounds of requests: a model still loading is asked again this much later.
ROUND_PAUSE_S = 1.0


def wait_for_answers(
    send: Callable[[str], requests.Response],
    names: Iterable[str],
    timeout: float,
    logs: Path,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Until `send(name)` answers 200 for every one of `names`. `check_alive` runs before each round and raises when
    the server cannot answer any more; a TimeoutError after `timeout` s names what never answered and the last
    error it gave."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    last_error = "no answer yet"
    while pending and time.monotonic() < deadline:
        check_alive()
        for name in sorted(pending):
            try:
                response = send(name)
            except requests.RequestException as error:
                last_error = f"{name}: {type(error).__name__}"
                continue
            if response.status_code == 200:
                pending.discard(name)
            else:
                last_error = f"{name}: HTTP {response.status_code} {response.text[:200]}"
        if pending:
            time.sleep(ROUND_PAUSE_S)
    if pending:
        raise TimeoutError(f"{sorted(pending)} did not answer within {timeout:.0f} s ({last_error}); logs in {logs}")
