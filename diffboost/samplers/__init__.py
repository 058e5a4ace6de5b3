from .bottleneck import BottleneckSampling  # noqa: F401
