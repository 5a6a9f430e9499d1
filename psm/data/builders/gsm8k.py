"""GSM8K (Cobbe et al. 2021): grade-school math word problems.

Splits: train (7,473) and test (1,319). Fields: `id` (0-based index of the
record among the non-blank lines of the split's JSONL file), `question`,
`answer` (the reference solution, with `<<a=b>>` calculator notes, ending in
`#### N`).

Manual folder (`$PSM_DATA_DIR/gsm8k/`): `train.jsonl`, `test.jsonl` as in
github.com/openai/grade-school-math (`grade_school_math/data/`).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from psm.data import jsonl
from psm.data.builders import base

_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
        "grade_school_math/data/{split}.jsonl")
FILES = {"train": "train.jsonl", "test": "test.jsonl"}
URLS = {k: _URL.format(split=k) for k in FILES}


class Gsm8k(base.SourceBuilder, skip_registration=True):
    """GSM8K train/test read from JSONL, TF-free (array_record output)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = base.instructions("gsm8k", FILES, URLS)

    def _info(self) -> tfds.core.DatasetInfo:
        return base.text_info(
            self,
            {"id": np.int64, "question": tfds.features.Text(), "answer": tfds.features.Text()},
            description="Grade-school math word problems with step-by-step solutions.",
            homepage="https://github.com/openai/grade-school-math",
            citation="Cobbe et al., Training Verifiers to Solve Math Word Problems, "
                     "arXiv:2110.14168, 2021.")

    def _split_generators(self, dl_manager):
        paths = base.locate_files(dl_manager, dataset="gsm8k", files=FILES, urls=URLS,
                                  download=lambda dl: dl.download(URLS))
        return {split: base.nonempty(self._generate_examples(paths[split]), paths[split], split)
                for split in FILES}

    def _generate_examples(self, path):
        records = jsonl.read_jsonl(path, required_keys=("question", "answer"))
        for i, rec in enumerate(records):
            yield i, {"id": i, "question": rec["question"], "answer": rec["answer"]}
