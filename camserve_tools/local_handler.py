"""A handler in-process, without TorchServe: for the handler's unit tests and the serving profile.

TorchServe's MockContext (shipped with it for handler unit tests) plus the per-request parts of the real Context
(headers, status, content type), which a handler answering each request of a batch on its own needs.
"""

from __future__ import annotations

from pathlib import Path

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


def batch_context(headers: list[dict[str, str]]) -> BatchContext:
    """A fresh per-batch context, one request's headers per row, as TorchServe gives the handler each batch."""
    return BatchContext(model_pt_file=None, model_file=None).for_batch(headers)


def initialised_handler(model_dir: Path | str, weights: str, name: str = "model", handler_class: type | None = None) -> object:
    """A handler (CamHandler by default) initialised from a model dir, as a worker initialises it from an archive."""
    from camserve.serving.handler import CamHandler

    context = BatchContext(
        model_pt_file=weights, model_dir=str(model_dir), model_file=None, model_name=name, model_yaml_config_file="model-config.yaml"
    )
    handler = (handler_class or CamHandler)()
    handler.initialize(context)
    return handler
