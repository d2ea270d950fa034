"""PLACEHOLDER (being written): DiversityGuidance."""


class DiversityGuidance:
    def __init__(self, *a, **k):
        raise NotImplementedError
