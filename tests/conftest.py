import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import toy_mixers  # noqa: E402,F401  (registers the test-only mixer before collection)
