"""The tiny config's `:test` variant with dotted-key overrides, shared by the tests that
train it in-process (`from tiny_config import tiny_test_config`)."""

from configs import tiny


def tiny_test_config(**overrides):
    """`configs/tiny.py:test` with `{"section.key": value}` overrides applied in order."""
    c = tiny.get_config("test")
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c
