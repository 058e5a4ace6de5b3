"""``diffboost bench``: speed and fidelity of acceleration configurations against the baseline.

Library use::

    from diffboost.bench import BenchSettings, default_configs, run_bench, write_all
    report = run_bench("assets/flux-shapes", default_configs(), BenchSettings(prompts=4, seeds=1))
    write_all(report, Path("runs/bench"))

CLI: ``diffboost bench --help`` (``add_arguments`` / ``run_from_args`` below).
"""

try:
    import diffboost_reference  # noqa: F401  (prompts from the scene generator, the attribute evaluator)
except ImportError:
    raise ImportError(
        "the bench needs the diffboost-reference package (its prompt sets and the attribute evaluator): "
        "pip install ./reference from the diffboost repository"
    ) from None

from .cli import add_arguments, main, run_from_args
from .configs import BenchConfig, ConfigError, PluginSpec, default_configs, load_configs, quick_configs
from .report import markdown, write_all
from .runner import BenchReport, BenchSettings, ConfigResult, Workload, prepare_workload, run_bench

__all__ = [
    "BenchConfig",
    "BenchReport",
    "BenchSettings",
    "ConfigError",
    "ConfigResult",
    "PluginSpec",
    "Workload",
    "add_arguments",
    "default_configs",
    "load_configs",
    "main",
    "markdown",
    "prepare_workload",
    "quick_configs",
    "run_bench",
    "run_from_args",
    "write_all",
]
