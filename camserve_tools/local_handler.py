"""A handler in-process, without TorchServe: for the handler's unit tests and the serving profile.

TorchServe's MockContext (shipped with it for handler unit tests) plus the per-request parts of the real Context
(headers, status, content type), which a handler answering each request of a batch on its own needs.
"""

from __future__ import annotations

from ts.context import Context, RequestProcessor
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext


class BatchContext(MockContext):
    get_all_request_header = Context.get_all_request_header
    get_request_header = Context.get_request_header
    set_response_status = Context.set_response_status
    get_response_status = Context.get_response_status
    set_response_content_type = Context.set_response_content_type
    get_response_content_type = Context.get_response_content_type
    set_response_header = Context.set_response_header
    request_processor = Context.request_processor
    get_response_headers = Context.get_response_headers

    def for_batch(self, headers: list[dict[str, str]]) -> BatchContext:
        """This context for one batch: one request's headers per row."""
        self._request_processor = [RequestProcessor(dict(h)) for h in headers]
        return self
