"""PLACEHOLDER (being written): features, guidance_grad, FeatureBank."""

from typing import NamedTuple


class GuidanceResult(NamedTuple):
    grad: object
    log_s: object


def features(z, normalize=True):
    raise NotImplementedError


def guidance_grad(z, bank, **kw):
    raise NotImplementedError


class FeatureBank:
    def __init__(self, capacity, *, device=None, dtype=None):
        raise NotImplementedError
