"""Bounds that hold for every request, whichever engine serves it."""

from __future__ import annotations

# Images (rows, instances) one client request may carry: an envelope's instances are answered in one batch, and
# each costs a decode, a forward pass and an answer however small it is.
MAX_INSTANCES = 32
# TorchServe's default max_request_size: every engine bounds a request's body by it unless configured otherwise.
TORCHSERVE_MAX_REQUEST_SIZE = 6_553_500
# TorchServe's default max_response_size, the same number, less room for its framing and an envelope around our
# bytes. An answer over the frontend's limit would make it drop the worker's connection, so it is refused in the
# worker.
TORCHSERVE_MAX_RESPONSE_SIZE = TORCHSERVE_MAX_REQUEST_SIZE
ENVELOPE_ALLOWANCE = 65_536
DEFAULT_MAX_ANSWER_BYTES = TORCHSERVE_MAX_RESPONSE_SIZE - ENVELOPE_ALLOWANCE
