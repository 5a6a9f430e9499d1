"""Alpaca (Taori et al. 2023): instruction-following demonstrations.

Split: train only. Fields: `id` (0-based index of the record in the JSON list),
`instruction`, `input` (may be empty), `output`.

Configs (each its own cache, so a 1k build is never mistaken for the full set):
  `full`: `alpaca_data.json` (52,002 records) from github.com/tatsu-lab/stanford_alpaca.
  `sample_1k`: `alpaca_data_1k.json`, a 1,000-record sample in the same format.
  Other file names: `Alpaca(config=AlpacaConfig(name=..., file_name=...))`.

Manual folder (`$PSM_DATA_DIR/alpaca/`): the config's `file_name`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psm.data import jsonl
from psm.data.builders import base

FIELDS = ("instruction", "input", "output")


@dataclasses.dataclass(eq=False)
class AlpacaConfig(tfds.core.BuilderConfig):
    """Which Alpaca file to read.

    Attributes:
      file_name: the JSON file (a list of {instruction, input, output}) in the
        manual folder.
      url: where the file can be downloaded; None for local-only files.
    """

    file_name: str = "alpaca_data.json"
    url: str | None = None


FULL = AlpacaConfig(
    name="full", file_name="alpaca_data.json",
    url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    description="The full 52,002-record release.")
SAMPLE_1K = AlpacaConfig(
    name="sample_1k", file_name="alpaca_data_1k.json",
    url=("https://raw.githubusercontent.com/wujindou/BLOOM-LORA/"
         "f9876f2dc53a625f3066236cb1f17dbdae6ea4fc/data/alpaca_data_1k.json"),
    description="A 1,000-record sample in the Alpaca format.")


class Alpaca(base.SourceBuilder, skip_registration=True):
    """Alpaca instruction data from one JSON file, TF-free (array_record output)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [FULL, SAMPLE_1K]
    DEFAULT_CONFIG_NAME = "full"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place alpaca_data.json (config 'full') or alpaca_data_1k.json (config 'sample_1k') "
        "in the manual folder of 'alpaca' (shared layout: $PSM_DATA_DIR/alpaca/).")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": np.int64}
        features.update({k: tfds.features.Text() for k in FIELDS})
        return base.text_info(
            self, features,
            description="Instruction-following demonstrations (instruction, input, output).",
            homepage="https://github.com/tatsu-lab/stanford_alpaca",
            citation="Taori et al., Stanford Alpaca: An Instruction-following LLaMA model, 2023.")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        files = {"train": cfg.file_name}
        urls = {"train": cfg.url} if cfg.url else {}
        paths = base.locate_files(
            dl_manager, dataset="alpaca", files=files, urls=urls,
            download=(lambda dl: {"train": epath.Path(dl.download(cfg.url))}) if cfg.url else None)
        return {"train": base.nonempty(self._generate_examples(paths["train"]), paths["train"],
                                       "train")}

    def _generate_examples(self, path):
        for i, rec in enumerate(jsonl.read_json_records(path, FIELDS)):
            yield i, {"id": i, **{k: rec[k] for k in FIELDS}}
