"""PLACEHOLDER demo (being written)."""


def add_arguments(parser):
    pass


def main(args):
    return 0
