"""Class activation maps in plain torch: methods, target layers and the lean extractor. No TorchServe here."""

from camserve.cam.extractor import CamExtractor, CamResult, MethodError, fuse_maps, normalize_maps
from camserve.cam.layers import LayerError, find_target_layer, to_grid
from camserve.cam.methods import METHODS, CamMethod, LayerCapture

__all__ = [
    "CamExtractor",
    "CamResult",
    "CamMethod",
    "LayerCapture",
    "LayerError",
    "METHODS",
    "MethodError",
    "find_target_layer",
    "fuse_maps",
    "normalize_maps",
    "to_grid",
]
