"""TFDS dataset builders for the tasks of the paper, used without TensorFlow.

Each builder writes `array_record` files (`file_format="array_record"`) and
is read with `builder.as_data_source()`; `psm.data.sources.load` wraps both.
"""

from psm.data.builders.alpaca import Alpaca, AlpacaConfig
from psm.data.builders.base import MissingDataError
from psm.data.builders.glue import Glue, GlueConfig
from psm.data.builders.gsm8k import Gsm8k
from psm.data.builders.hendrycks_math import HendrycksMath
from psm.data.builders.humaneval import HumanEval

__all__ = ["Alpaca", "AlpacaConfig", "Glue", "GlueConfig", "Gsm8k", "HendrycksMath",
           "HumanEval", "MissingDataError"]
