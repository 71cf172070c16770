"""Flax linen building blocks with scvi-tools' architecture."""

from .layers import BatchNorm, Dense, FCLayers
from .networks import Classifier, Decoder, DecoderSCVI, Encoder
