"""Training K data-order replicas in one compiled program (`python -m psm.train`).

| module | job |
| --- | --- |
| `trainer` | the run: data, base model, K-replica training, merges, evaluation, results |
| `replicas` | the vmapped K-replica train and eval steps on stacked NNX state |
| `sharding` | the (replica, fsdp, tensor) device mesh and logical-axis rules |
| `checkpoint` | orbax checkpoints of the stacked state: save, keep, find, restore |
| `base_model` | the base the replicas start from: pretrained, pre-trained here, or random |
| `pretrain` | the short pre-training of the offline default's base on synthetic text |
| `encoder_task` | the BERT classification/regression path (GLUE) of the same trainer |
| `diagnostics` | merge readiness: loss barriers and task-vector geometry |
| `workdir` | a run folder's config.json, its comparison on resume, its files |
| `metrics` | metrics.jsonl: written per step, read back |
| `report` | the printed results table and the names of merges and reference rows |
"""
