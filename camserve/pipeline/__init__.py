"""The request -> label + map pipeline, engine-free: plain Python and torch, no TorchServe or KServe import."""

from camserve.pipeline.pipeline import CamPipeline
from camserve.pipeline.types import Answer, Metrics, NoMetrics, Prediction, Request, Row
from camserve.protocol.decoding import RequestError

__all__ = ["Answer", "CamPipeline", "Metrics", "NoMetrics", "Prediction", "Request", "RequestError", "Row"]
