"""HumanEval (Chen et al. 2021): 164 hand-written Python problems.

Split: test only. Fields: `id` (0-based record index in HumanEval.jsonl.gz,
equal to N in `task_id` "HumanEval/N"), `task_id`, `prompt` (signature and
docstring), `canonical_solution` (the body that completes the prompt), `test`
(defines `check(candidate)`), `entry_point` (the function name).

Manual folder (`$PSM_DATA_DIR/humaneval/`): `HumanEval.jsonl.gz` (or the
uncompressed `HumanEval.jsonl`) from github.com/openai/human-eval (`data/`).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psm.data import jsonl
from psm.data.builders import base

URL = "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz"
FILES = {"test": "HumanEval.jsonl.gz"}
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


class HumanEval(base.SourceBuilder, skip_registration=True):
    """HumanEval problems, TF-free (array_record output)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = base.instructions("humaneval", FILES, {"test": URL})

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": np.int64}
        features.update({k: tfds.features.Text() for k in FIELDS})
        return base.text_info(
            self, features,
            description="Python function-completion problems with unit tests.",
            homepage="https://github.com/openai/human-eval",
            citation="Chen et al., Evaluating Large Language Models Trained on Code, "
                     "arXiv:2107.03374, 2021.")

    def _split_generators(self, dl_manager):
        manual = base.existing_manual_dir(dl_manager)
        files = dict(FILES)
        if manual is not None and not (manual / files["test"]).exists() \
                and (manual / "HumanEval.jsonl").exists():
            files["test"] = "HumanEval.jsonl"
        # `download` (not `download_and_extract`): the reader gunzips by itself.
        paths = base.locate_files(dl_manager, dataset="humaneval", files=files,
                                  urls={"test": URL},
                                  download=lambda dl: {"test": epath.Path(dl.download(URL))})
        return {"test": base.nonempty(self._generate_examples(paths["test"]), paths["test"],
                                      "test")}

    def _generate_examples(self, path):
        for i, rec in enumerate(jsonl.read_jsonl(path, FIELDS)):
            yield i, {"id": i, **{k: rec[k] for k in FIELDS}}
