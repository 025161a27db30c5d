"""lrfast: fast, exact optimizer updates and learning-rate schedules for CPU training.

Optimizers (torch.optim's names, defaults and formulas, over NumPy arrays, updated in place):
``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW``. In-place functions: ``lrfast.functional``;
their pure-NumPy twins: ``lrfast.reference``. Threads: ``set_num_threads``, ``get_num_threads``,
``threads``. Learning-rate schedules: ``lrfast.schedules`` (closed form, scalar and vector
paths) and ``ReduceLROnPlateau``. Gradient clipping: ``clip_grad_norm_``, ``grad_norm``. Exact
resume: ``save_checkpoint``, ``load_checkpoint``. Weight averages (EMA, SWA): ``Averager``.
Build facts: ``show_config``. Convergence comparisons of optimizers and schedules:
``compare`` (``python -m lrfast compare``).
"""
from ._version import __version__

try:
    from . import _dispatch, _openmp, _optim  # noqa: F401  (compiled kernels)
except ImportError as exc:
    from ._install_help import kernels_missing_message

    raise ImportError(kernels_missing_message(exc)) from exc

from . import functional, reference, schedules  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from .clipping import clip_grad_norm, clip_grad_norm_, grad_norm  # noqa: E402
from ._config import show_config  # noqa: E402
from ._threads import get_num_threads, set_num_threads, threads  # noqa: E402
from .flat import FlatParams  # noqa: E402
from . import optim  # noqa: E402
from .averaging import Averager, num_updates_decay, warmup_decay  # noqa: E402
from .optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop  # noqa: E402
from .plateau import ReduceLROnPlateau  # noqa: E402
from . import quantization  # noqa: E402
from .quantization import Int8State  # noqa: E402
from . import embedding  # noqa: E402
from . import comparison  # noqa: E402
from .comparison import compare  # noqa: E402
from .embedding import (RowWiseAdagrad, RowWiseAdam, SparseAdagrad, SparseAdam,  # noqa: E402
                        SparseSGD, merge_rows)

__all__ = [
    "__version__",
    "Optimizer",
    "FlatParams",
    "Averager",
    "warmup_decay",
    "num_updates_decay",
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "functional",
    "reference",
    "schedules",
    "ReduceLROnPlateau",
    "clip_grad_norm_",
    "clip_grad_norm",
    "grad_norm",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "show_config",
    "quantization",
    "Int8State",
    "embedding",
    "SparseSGD",
    "SparseAdagrad",
    "RowWiseAdagrad",
    "SparseAdam",
    "RowWiseAdam",
    "merge_rows",
    "comparison",
    "compare",
]

# Every optimizer class of the spec table, including any the import above does not name.
globals().update({name: getattr(optim, name) for name in optim.__all__})
__all__ += [name for name in optim.__all__ if name not in __all__]
