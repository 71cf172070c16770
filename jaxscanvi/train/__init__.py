"""Optimiser, train state, minibatch sources and the training loop."""

from .state import KLSchedule, TrainState, make_optimizer
