"""Distillation of a teacher pipeline into a one-step / few-step student (issue #24).

Not imported by the runtime: ``diffboost.distill`` is a training tool used by the command line
(``diffboost distill``) and by users; the student it writes is served by the
:class:`~diffboost.samplers.onestep.OneStep` plugin or loaded as a pipeline of its own.
"""

from .reflow import step_sigmas, training_sigmas  # noqa: F401
from .teachers import UnsupportedTeacherError, teacher_for  # noqa: F401
from .trainer import METHODS, DistillConfig, distill  # noqa: F401
