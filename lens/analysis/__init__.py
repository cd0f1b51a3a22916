"""Analyses: pure functions of a ``Run`` returning tidy results (``.to_frame()``, ``.figure()``)."""

from lens.analysis.compare import CompareResult, compare
from lens.analysis.decoding import DecodingResult, decoding
from lens.analysis.interpretability import InterpretabilityResult, interpretability
from lens.analysis.latent import Neighbours
from lens.analysis.neurons import NeuronResult, neurons
from lens.analysis.sinks import SinkResult, sinks
from lens.analysis.textbank import TextBank
from lens.analysis.valley import ValleyResult, valley
from lens.analysis.vision import VisionResult, vision
from lens.analysis.visual_tokens import VisualTokens, visual_tokens

__all__ = ["SinkResult", "sinks", "ValleyResult", "valley", "CompareResult", "compare", "NeuronResult",
           "neurons", "DecodingResult", "decoding", "VisionResult", "vision", "TextBank", "Neighbours",
           "visual_tokens", "VisualTokens", "interpretability", "InterpretabilityResult"]
