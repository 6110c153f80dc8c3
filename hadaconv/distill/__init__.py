"""Knowledge distillation of a converted model from its original (``hadaconv distill``).

Least squares keeps each projection's output close on average, but the errors of many
converted layers compound; distillation trains the converted model (the student) to match the
original (the teacher) again.  ``distill(student, teacher, tokenizer, DistillConfig(...))``
returns a :class:`DistillReport`; :func:`distill_file` is what the command line does (load,
distill, save a folder :func:`hadaconv.load` rebuilds, report, plot).

Modules: :mod:`~hadaconv.distill.core` (the loop), :mod:`~hadaconv.distill.local` (block-wise
reconstruction), :mod:`~hadaconv.distill.losses`, :mod:`~hadaconv.distill.parallel` (torchrun,
DDP, FSDP2), :mod:`~hadaconv.distill.checkpoint` (exact resume), :mod:`~hadaconv.distill.files`.
"""

from hadaconv.distill.core import DistillConfig, DistillReport, check_config, converted_blocks, default_lr, distill
from hadaconv.distill.files import distill_file, plot_curve

__all__ = ["DistillConfig", "DistillReport", "check_config", "converted_blocks", "default_lr", "distill",
           "distill_file", "plot_curve"]
