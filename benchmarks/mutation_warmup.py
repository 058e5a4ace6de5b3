"""pytest plugin for the mutation runs (``benchmarks/mutation.py``): warm the fork server up once.

mutmut forks one process per mutant from a server that has collected the tests. Without this plugin
each forked process pays again for everything torch and diffusers initialise lazily on a first call
(kernel selection, the tiny tokenizer, first-use imports), and pytest's end-of-session
``gc.collect()`` walks, and so copies page by page, every object the server holds. Measured on a
block-cache mutant's two covering pipeline tests: 5.2 s per forked run before, 0.6 s after.

What it does, once per process, after the first collection (in the server, before any fork):
build every tiny pipeline of ``tests/factories.py`` and call it once for 2 steps, then
``gc.freeze()`` so that later collections leave the inherited objects alone. It calls no diffboost
code (no plugin is applied), so no mutant can run during the warm-up and every test still runs in
full, in its own process, against its mutant. The mutation script also turns off pytest's
``unraisableexception`` plugin, whose only effect on a passing or failing test is that
end-of-session garbage collection.
"""

from __future__ import annotations

import gc
import os
import sys

_done = False


def pytest_collection_finish(session) -> None:
    global _done
    if _done:
        return
    _done = True
    tests = os.path.join(str(session.config.rootpath), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import factories  # tests/factories.py: the tiny pipelines the tests build
    import torch

    for family, make in factories.FAMILIES.items():
        with torch.no_grad():
            pipe = make()
            factories.run(pipe, family, num_inference_steps=2)
            if family in ("flux", "sd"):  # the decoded path too (VAE, image processor)
                factories.run(pipe, family, num_inference_steps=2, output_type="pt")
        del pipe
    gc.collect()
    gc.freeze()
