"""Analyses: pure functions of a ``Run`` returning tidy results (``.to_frame()``, ``.figure()``)."""

from lens.analysis.compare import CompareResult, compare
from lens.analysis.decoding import DecodingResult, decoding
from lens.analysis.neurons import NeuronResult, neurons
from lens.analysis.sinks import SinkResult, sinks
from lens.analysis.valley import ValleyResult, valley
from lens.analysis.vision import VisionResult, vision

__all__ = ["SinkResult", "sinks", "ValleyResult", "valley", "CompareResult", "compare", "NeuronResult",
           "neurons", "DecodingResult", "decoding", "VisionResult", "vision"]
