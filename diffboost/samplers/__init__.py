from .bottleneck import BottleneckSampling  # noqa: F401
from .onestep import OneStep  # noqa: F401
from .sada import SADA  # noqa: F401
