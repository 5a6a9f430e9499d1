"""Merging K fine-tuned models: the public API, `psm.merge.select(models, key=..., base=...)` etc.

The package's parts, each with one job (read them in this order):

| module | job |
| --- | --- |
| `methods` | the merge methods on parameter trees in memory (this API; full docs there) |
| `leaf_inputs` | the two input forms (K trees, or one stacked tree), leaf names, checks |
| `kernels` | jitted elementwise kernels: one body per method, whole-leaf and chunked |
| `ties_threshold` | TIES's exact top-k magnitude threshold in linear time |
| `host_staging` | host-resident leaves merged chunk by chunk into huge-page memory |
| `streaming` | checkpoints larger than memory, merged tensor by tensor on disk |
| `__main__` | the command `python -m psm.merge` over `streaming` |

Dependencies run one way: `__main__` -> `streaming` -> `methods` -> (`leaf_inputs`,
`ties_threshold`, `host_staging`) -> `kernels`; nothing imports `__main__`, and this file
only re-exports `methods`.
"""

# The public names are listed once, in methods.__all__.
from psm.merge.methods import *  # noqa: F401,F403
from psm.merge.methods import __all__  # noqa: F401
