"""Token reduction inside denoiser blocks (``PluginKind.TOKENS``): ToMe for SD and ToDo."""

from .merging import TokenDownsampling, TokenMerging

__all__ = ["TokenDownsampling", "TokenMerging"]
