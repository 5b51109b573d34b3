"""Algorithms that decide numbers (scales, rounded weights) from calibration statistics; the passes
in onnxquant.passes write them into the graph."""
