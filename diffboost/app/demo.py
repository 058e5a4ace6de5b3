"""Web demo: one prompt and seed through the plain and the accelerated pipeline, side by side.

    diffboost demo [--model PATH] [--host 127.0.0.1] [--port 7860]

The page shows both images, both wall times, the speedup, PSNR / SSIM of the accelerated image
against the plain one and how many denoiser calls were computed. It binds to 127.0.0.1 unless
``--host`` says otherwise and takes no uploads (text and numbers only). One pipeline serves every
request, one request at a time (Gradio's queue and a lock), so timings are not mixed up.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..limits import check_seed

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 500
MAX_STEPS = 100
DISPLAY_PX = 256  # small reference-model images are shown enlarged (nearest neighbour)


@dataclass
class Comparison:
    """What one ``compare`` call measured."""

    baseline: Any  # PIL image
    accelerated: Any
    baseline_s: float
    accelerated_s: float
    psnr_db: float
    ssim: float
    computed_calls: int | None  # denoiser calls computed (the others reused, forecast or skipped)
    total_calls: int | None
    plugins: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.accelerated_s

    def summary_markdown(self) -> str:
        psnr = "identical" if not np.isfinite(self.psnr_db) else f"{self.psnr_db:.2f} dB"
        return "\n".join([
            "| | plain | accelerated |",
            "|---|---|---|",
            f"| wall time | {self.baseline_s:.3f} s | {self.accelerated_s:.3f} s |",
            *([f"| denoiser calls computed | {self.total_calls} | {self.computed_calls} |"]
              if self.computed_calls is not None else []),
            "",
            f"**{self.speedup:.2f}x faster**; accelerated vs plain: PSNR {psnr}, SSIM {self.ssim:.4f}.",
            f"Plugins: {', '.join(self.plugins)}.",
        ])


#: the choice that serves the distilled student next to the model (``MODEL-1step``)
ONESTEP = "onestep"


class DemoModel:
    """A local pipeline folder loaded once, with the generation settings shipped next to it."""

    def __init__(self, path: str | Path, dtype: str = "float32", stacks: dict[str, list[Any]] | None = None) -> None:
        from ..generation import default_call_kwargs, load_pipeline, model_defaults, student_of

        #: plugin stacks offered besides the presets (``--plugins FILE``), by label
        self.stacks = dict(stacks or {})
        self.path = Path(path)
        student = student_of(self.path)
        if student is not None:  # a distilled student next to the model: offered as "onestep"
            from ..samplers.onestep import OneStep

            self.stacks.setdefault(ONESTEP, [OneStep(str(student))])
        self.pipe = load_pipeline(self.path, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.defaults = model_defaults(self.path)
        self.call_kwargs = default_call_kwargs(self.pipe, self.defaults)
        self.default_steps = int(self.defaults.get("steps", 28))
        self._lock = threading.Lock()
        self._warm = False

    def compare(self, prompt: str, preset: str = "fast", steps: int | None = None, seed: int = 0) -> Comparison:
        """Run ``prompt`` plain, then with ``preset`` applied (removed again afterwards)."""
        import diffboost

        from ..generation import call_counts
        from ..generation import generate_once as _generate_once
        from ..fidelity import psnr, ssim
        from ..plugins.presets import resolve

        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be a whole number, got {steps!r}")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        seed = check_seed(seed, "the seed")
        plugins = self.stacks[preset] if preset in self.stacks else resolve(preset)  # unknown names fail here

        def run() -> tuple[Any, float]:
            return _generate_once(self.pipe, prompt, steps, seed, None, None, self.call_kwargs)

        with self._lock:
            if not self._warm:  # the first call of a process pays one-off costs; keep them out of the timings
                _generate_once(self.pipe, prompt, 2, seed, None, None, self.call_kwargs)
                self._warm = True
            base, t_base = run()
            diffboost.apply(self.pipe, plugins)
            try:
                fast, t_fast = run()
                info = diffboost.describe(self.pipe)
            finally:
                diffboost.remove(self.pipe)
        counts = call_counts(info) or (None, None)
        a, b = [base.convert("RGB")], [fast.convert("RGB")]
        return Comparison(
            baseline=base, accelerated=fast, baseline_s=t_base, accelerated_s=t_fast,
            psnr_db=float(psnr(a, b)), ssim=float(ssim(a, b)),
            computed_calls=counts[0], total_calls=counts[1],
            plugins=list(info["plugins"]),
        )


def _enlarge(image: Any) -> Any:
    from PIL import Image

    if max(image.size) >= DISPLAY_PX:
        return image
    factor = max(1, DISPLAY_PX // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _whole(value: Any, what: str) -> int:
    """A page number field's value as an int (Gradio sends floats; NaN, infinities and fractions are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def handle(model: DemoModel, prompt: str, preset: str, steps: float, seed: float) -> tuple[Any, Any, str]:
    """The page's button: two (enlarged) images and the summary; bad input becomes a page error."""
    import gradio as gr

    try:
        result = model.compare(prompt, preset, _whole(steps, "steps"), _whole(seed, "the seed"))
    except ValueError as err:
        raise gr.Error(str(err)) from None
    return _enlarge(result.baseline), _enlarge(result.accelerated), result.summary_markdown()


def build_app(model: DemoModel) -> Any:
    """The Gradio page (``gr.Blocks``) for ``model``."""
    import gradio as gr

    from ..generation import DEFAULT_PROMPT
    from ..plugins.presets import PRESETS

    with gr.Blocks(title="diffboost: plain vs accelerated") as app:
        gr.Markdown(f"## diffboost: plain vs accelerated\nModel: `{model.path}`")
        with gr.Row():
            prompt = gr.Textbox(value=DEFAULT_PROMPT, label="prompt", max_length=MAX_PROMPT_CHARS, scale=4)
            user = [k for k in model.stacks if k != ONESTEP]  # --plugins files: listed first, the first selected
            choices = [*user, *sorted(PRESETS), *[k for k in model.stacks if k == ONESTEP]]
            preset = gr.Dropdown(choices=choices, value=choices[0] if user else "fast", label="preset")
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=model.default_steps, step=1, label="steps")
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
            run = gr.Button("Generate both", variant="primary")
        with gr.Row():
            plain = gr.Image(label="plain pipeline", type="pil", format="png")
            fast = gr.Image(label="accelerated", type="pil", format="png")
        summary = gr.Markdown()
        run.click(lambda *args: handle(model, *args), inputs=[prompt, preset, steps, seed],
                  outputs=[plain, fast, summary], concurrency_limit=1)
    return app


def launch(model_path: str | Path, host: str = "127.0.0.1", port: int = 7860, dtype: str = "float32",
           stacks: dict[str, list[Any]] | None = None) -> None:
    """Load the model and serve the page on ``host:port`` (blocks until interrupted)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ImportError('the demo needs Gradio: pip install -e ".[demo]"')
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the demo listens on %s: anyone who can reach this machine can use it", host)
    app = build_app(DemoModel(model_path, dtype, stacks))
    app.queue(max_size=16).launch(server_name=host, server_port=port, share=False)
