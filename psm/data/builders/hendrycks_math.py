"""MATH (Hendrycks et al. 2021): competition mathematics, seven subjects.

Splits: train (7,500) and test (5,000). Fields:
  `id`: the 0-based rank of the problem when the split's files are ordered by
    (subject in `SUBJECTS` order, integer file stem); the original release is
    fixed, so the id is the same in every run and rebuild.
  `source_key`: `"<subject>/<stem>.json"`, the file the problem came from.
  `problem`, `solution` (the worked solution; its last `\\boxed{...}` holds the
    final answer, extracted by the scorer), `level` (1-5, or -1 where the
    source says "Level ?", as two train problems do), `subject` (folder name,
    e.g. "intermediate_algebra"), `type` (display name, e.g. "Intermediate
    Algebra").

Manual folder (`$PSM_DATA_DIR/math/`): `train/<subject>/<n>.json` and
`test/<subject>/<n>.json` as in the original MATH.tar (a top-level `MATH/`
folder is also accepted).
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psm.data import jsonl
from psm.data.builders import base

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
            "number_theory", "prealgebra", "precalculus")
URL = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"
FILES = {"train": "train", "test": "test"}
_LEVEL = re.compile(r"^Level (\d)$")


def parse_level(text: str, where: str) -> int:
    """'Level 3' -> 3; 'Level ?' -> -1; anything else is an error."""
    m = _LEVEL.match(text.strip())
    if m:
        return int(m.group(1))
    if text.strip() == "Level ?":
        return -1
    raise jsonl.DataFormatError(f"{where}: unexpected level {text!r} (want 'Level 1'..'Level 5')")


def _download(dl_manager) -> dict[str, epath.Path]:
    root = epath.Path(dl_manager.download_and_extract(URL))
    if (root / "MATH").exists():
        root = root / "MATH"
    return {k: root / rel for k, rel in FILES.items()}


class HendrycksMath(base.SourceBuilder, skip_registration=True):
    """MATH train/test from per-problem JSON files, TF-free (array_record output)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        base.instructions("math", FILES, {"tar": URL})
        + "\nEach holds one folder per subject: " + ", ".join(SUBJECTS)
        + ", with one <n>.json per problem.")

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return base.text_info(
            self,
            {"id": np.int64, "source_key": text, "problem": text, "solution": text,
             "level": np.int32, "subject": text, "type": text},
            description="Competition mathematics problems with worked solutions.",
            homepage="https://github.com/hendrycks/math",
            citation="Hendrycks et al., Measuring Mathematical Problem Solving With the MATH "
                     "Dataset, NeurIPS 2021.")

    def _split_generators(self, dl_manager):
        paths = base.locate_files(dl_manager, dataset="math", files=FILES, urls={"tar": URL},
                                  download=_download)
        return {split: base.nonempty(self._generate_examples(paths[split]), paths[split], split)
                for split in FILES}

    def _generate_examples(self, split_dir):
        split_dir = epath.Path(split_dir)
        missing = [s for s in SUBJECTS if not (split_dir / s).is_dir()]
        if missing:
            raise base.MissingDataError(
                f"{split_dir} lacks subject folder(s) {missing}; MATH has all of {SUBJECTS}")
        i = 0
        for subject in SUBJECTS:
            files = []
            for f in (split_dir / subject).iterdir():
                if f.suffix != ".json":
                    continue
                if not f.stem.isdigit():
                    raise jsonl.DataFormatError(
                        f"{f}: MATH problem files are named <integer>.json")
                files.append((int(f.stem), f))
            for stem, f in sorted(files):
                rec = jsonl.read_json_object(f, ("problem", "level", "type", "solution"))
                yield i, {
                    "id": i,
                    "source_key": f"{subject}/{stem}.json",
                    "problem": rec["problem"],
                    "solution": rec["solution"],
                    "level": parse_level(rec["level"], str(f)),
                    "subject": subject,
                    "type": rec["type"],
                }
                i += 1
