import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import toy_mixers  # noqa: E402,F401  (registers the test-only mixers before collection)

from attnzoo.data import ByteTokenizer, TokenDataset  # noqa: E402


@pytest.fixture(scope="session")
def dataset():
    """A small byte-token dataset of random words (train and val splits) for training-loop tests."""
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "pi"], 3000))
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.uint16)
    return TokenDataset({"train": tokens[:-2000], "val": tokens[-2000:]}, ByteTokenizer())
