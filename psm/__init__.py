"""psm: train K data-order replicas of a language model and merge them.

See README.md for the two commands that run the default job and the tests.
"""

__version__ = "0.1.0"
