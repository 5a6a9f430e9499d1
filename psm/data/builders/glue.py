"""GLUE tasks CoLA, SST-2, MRPC, RTE, STS-B and WNLI (Wang et al. 2018).

Splits: train, validation (GLUE's dev.tsv) and test. Test labels are hidden
in GLUE, so every test example has `label` -1 (-1.0 for STS-B), as in the
TFDS `glue` builder.

Fields: `id` (0-based index of the example within its split, in file order),
`idx` (the TFDS `glue` index: the row number in the source file, which for
MRPC train/validation is the row in `msr_paraphrase_train.txt`), the task's
text fields (`sentence`, or `sentence1` and `sentence2`) and `label`
(class index, or the 0-5 similarity score for STS-B). Class indices follow
TFDS: cola 0 unacceptable / 1 acceptable; sst2 0 negative / 1 positive;
mrpc 0 not_equivalent / 1 equivalent; rte 0 entailment / 1 not_entailment;
wnli 0 not_entailment / 1 entailment.

MRPC is built from the raw Microsoft files as TFDS does, which gives the
official 3,668 train rows (the GLUE `MRPC/train.tsv` from the download script
lacks one).

Manual folder (`$PSM_DATA_DIR/glue/`): `glue_data/<Task>/{train,dev,test}.tsv`
as written by the GLUE download script (the `glue_data/` level may be left
out), and for MRPC `glue_data/MRPC/{msr_paraphrase_train.txt,
msr_paraphrase_test.txt,dev_ids.tsv}`.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psm.data import jsonl
from psm.data.builders import base

_FB = "https://dl.fbaipublicfiles.com"
MRPC_URLS = {
    "dev_ids": ("https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations."
                "appspot.com/o/data%2Fmrpc_dev_ids.tsv?alt=media&"
                "token=ec5c0836-31d5-48f4-b431-7480817f1adc"),
    "train": f"{_FB}/senteval/senteval_data/msr_paraphrase_train.txt",
    "test": f"{_FB}/senteval/senteval_data/msr_paraphrase_test.txt",
}
MRPC_FILES = {"dev_ids": "dev_ids.tsv", "train": "msr_paraphrase_train.txt",
              "test": "msr_paraphrase_test.txt"}
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


@dataclasses.dataclass(eq=False)
class GlueConfig(tfds.core.BuilderConfig):
    """One GLUE task.

    Attributes:
      folder: the task folder in `glue_data/` (e.g. "SST-2").
      url: the task zip of the GLUE download script (unused for MRPC).
      text_features: `{feature name: TSV column}`.
      label_column: the TSV column holding the label.
      label_classes: class names in index order; None for a float label.
    """

    folder: str = ""
    url: str = ""
    text_features: dict = dataclasses.field(default_factory=dict)
    label_column: str = "label"
    label_classes: tuple | None = None


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}
CONFIGS = {
    "cola": GlueConfig(name="cola", folder="CoLA", url=f"{_FB}/glue/data/CoLA.zip",
                       text_features={"sentence": "sentence"}, label_column="is_acceptable",
                       label_classes=("unacceptable", "acceptable"),
                       description="Corpus of Linguistic Acceptability"),
    "sst2": GlueConfig(name="sst2", folder="SST-2", url=f"{_FB}/glue/data/SST-2.zip",
                       text_features={"sentence": "sentence"},
                       label_classes=("negative", "positive"),
                       description="Stanford Sentiment Treebank (binary)"),
    "mrpc": GlueConfig(name="mrpc", folder="MRPC",
                       text_features={"sentence1": "#1 String", "sentence2": "#2 String"},
                       label_column="Quality", label_classes=("not_equivalent", "equivalent"),
                       description="Microsoft Research Paraphrase Corpus"),
    "rte": GlueConfig(name="rte", folder="RTE", url=f"{_FB}/glue/data/RTE.zip",
                      text_features=_PAIR, label_classes=("entailment", "not_entailment"),
                      description="Recognizing Textual Entailment"),
    "stsb": GlueConfig(name="stsb", folder="STS-B", url=f"{_FB}/glue/data/STS-B.zip",
                       text_features=_PAIR, label_column="score", label_classes=None,
                       description="Semantic Textual Similarity Benchmark (0-5 score)"),
    "wnli": GlueConfig(name="wnli", folder="WNLI", url=f"{_FB}/glue/data/WNLI.zip",
                       text_features=_PAIR, label_classes=("not_entailment", "entailment"),
                       description="Winograd NLI"),
}


def _read_tsv(path, *, header: bool) -> list[tuple[int, dict | list]]:
    """Rows of a GLUE TSV as `(line_number, row)`; dict rows when `header`.

    GLUE files are tab-separated without quoting (sentences contain quote
    characters), hence `QUOTE_NONE`. A UTF-8 BOM (the MRPC files have one)
    is dropped. A row with the wrong number of fields is an error.
    """
    path = os.fspath(path)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = next(reader) if header else None
        for row in reader:
            if not row:
                continue
            if names is not None:
                if len(row) != len(names):
                    raise jsonl.DataFormatError(
                        f"{path}:{reader.line_num}: {len(row)} tab-separated fields, the "
                        f"header has {len(names)} ({names})")
                row = dict(zip(names, row))
            out.append((reader.line_num, row))
    return out


class Glue(base.SourceBuilder, skip_registration=True):
    """Six GLUE tasks from the GLUE TSV files, TF-free (array_record output)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = list(CONFIGS.values())
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the output of the GLUE download script in the manual folder of 'glue' "
        "(shared layout: $PSM_DATA_DIR/glue/glue_data/<Task>/{train,dev,test}.tsv; "
        "MRPC needs msr_paraphrase_train.txt, msr_paraphrase_test.txt, dev_ids.tsv).")

    @classmethod
    def manual_files(cls, config: GlueConfig, prefix: str = "glue_data/") -> dict[str, str]:
        """`{key: path relative to the manual folder}` of the files a task needs."""
        names = MRPC_FILES if config.name == "mrpc" else SPLIT_FILES
        return {k: f"{prefix}{config.folder}/{v}" for k, v in names.items()}

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {"id": np.int64, "idx": np.int64}
        features.update({k: tfds.features.Text() for k in cfg.text_features})
        features["label"] = np.int64 if cfg.label_classes else np.float32
        return base.text_info(
            self, features, description=f"GLUE {cfg.name}: {cfg.description}",
            homepage="https://gluebenchmark.com",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for "
                     "Natural Language Understanding, ICLR 2019 (cite each task's source).")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        manual = base.existing_manual_dir(dl_manager)
        prefix = "glue_data/"
        if manual is not None and not (manual / "glue_data").is_dir() \
                and (manual / cfg.folder).is_dir():
            prefix = ""
        files = self.manual_files(cfg, prefix)
        if cfg.name == "mrpc":
            urls = MRPC_URLS

            def download(dl):
                return {k: epath.Path(p) for k, p in dl.download(MRPC_URLS).items()}
        else:
            urls = {"zip": cfg.url}

            def download(dl):
                root = epath.Path(dl.download_and_extract(cfg.url)) / cfg.folder
                return {k: root / v for k, v in SPLIT_FILES.items()}
        paths = base.locate_files(dl_manager, dataset="glue", files=files, urls=urls,
                                  download=download)
        if cfg.name == "mrpc":
            # Train and validation are both read from the train file (split by dev_ids).
            return {split: base.nonempty(self._generate_mrpc(paths, split),
                                         paths["test" if split == "test" else "train"], split)
                    for split in SPLIT_FILES}
        return {split: base.nonempty(self._generate_examples(paths[split], split), paths[split],
                                     split)
                for split in SPLIT_FILES}

    def _label(self, raw: str, where: str):
        cfg = self.builder_config
        try:
            if cfg.label_classes is None:
                return np.float32(raw)
            if raw in cfg.label_classes:
                return cfg.label_classes.index(raw)
            label = int(raw)
        except ValueError:
            label = None
        if label is None or not 0 <= label < len(cfg.label_classes or ()):
            want = cfg.label_classes or "a float"
            raise jsonl.DataFormatError(f"{where}: bad label {raw!r}; expected one of {want}")
        return label

    def _generate_examples(self, path, split):
        cfg = self.builder_config
        # CoLA train/dev are the only GLUE files without a header: columns are
        # source, label, original annotation, sentence.
        headerless = cfg.name == "cola" and split != "test"
        unlabeled = -1 if cfg.label_classes else np.float32(-1.0)
        for i, (line, row) in enumerate(_read_tsv(path, header=not headerless)):
            where = f"{path}:{line}"
            if headerless:
                if len(row) != 4:
                    raise jsonl.DataFormatError(
                        f"{where}: {len(row)} fields; CoLA rows have 4 (source, label, "
                        "original label, sentence)")
                row = {"sentence": row[3], cfg.label_column: row[1]}
            ex = {"id": i, "idx": i}
            for feat, col in cfg.text_features.items():
                if col not in row:
                    raise jsonl.DataFormatError(f"{where}: no column {col!r}")
                ex[feat] = row[col]
            if split == "test":
                ex["label"] = unlabeled
            else:
                if cfg.label_column not in row:
                    raise jsonl.DataFormatError(f"{where}: no label column {cfg.label_column!r}")
                ex["label"] = self._label(row[cfg.label_column], where)
            yield i, ex

    def _generate_mrpc(self, paths, split):
        cfg = self.builder_config
        if split == "test":
            rows = _read_tsv(paths["test"], header=True)
            for i, (_, row) in enumerate(rows):
                yield i, {"id": i, "idx": i, "sentence1": row["#1 String"],
                          "sentence2": row["#2 String"], "label": -1}
            return
        dev_ids = {tuple(r[:2]) for _, r in _read_tsv(paths["dev_ids"], header=False)}
        i = 0
        for n, (line, row) in enumerate(_read_tsv(paths["train"], header=True)):
            if ((row["#1 ID"], row["#2 ID"]) in dev_ids) != (split == "validation"):
                continue
            yield i, {"id": i, "idx": n, "sentence1": row["#1 String"],
                      "sentence2": row["#2 String"],
                      "label": self._label(row[cfg.label_column],
                                           f"{paths['train']}:{line}")}
            i += 1
