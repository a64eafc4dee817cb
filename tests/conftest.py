import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny shapes, so their time goes to XLA's compiler, not to running the code: LLVM at -O0 without its
# expensive passes compiles about a quarter faster, with the same float32 arithmetic (see docs/TESTING.md). Set
# before jax initialises its backend; subprocesses the tests start inherit it.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

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


# -- the per-mixer test budget ---------------------------------------------------------------------------------
# The registry-wide tests (contract and options) run for every mixer a new file registers, so each name inherits
# this budget of test time (seconds of calls on the 2-core CI machine; see docs/TESTING.md). A run lists the names
# over it at the end instead of failing, because timings depend on the machine's load.
MIXER_TEST_BUDGET_S = float(os.environ.get("ATTNZOO_MIXER_TEST_BUDGET_S", 25))  # 0 lists every mixer
REGISTRY_WIDE_TESTS = ("test_mixer_contract.py", "test_mixer_options.py")
_seconds_per_mixer: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    mixer = params.get("mixer", params.get("name"))
    if report.when == "call" and item.path.name in REGISTRY_WIDE_TESTS and isinstance(mixer, str):
        report.user_properties.append(("mixer", mixer.split("(")[0]))  # travels to the xdist controller


def pytest_runtest_logreport(report):
    for key, mixer in report.user_properties:
        if key == "mixer" and report.when == "call":
            _seconds_per_mixer[mixer] = _seconds_per_mixer.get(mixer, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = {m: s for m, s in sorted(_seconds_per_mixer.items(), key=lambda kv: -kv[1]) if s > MIXER_TEST_BUDGET_S}
    if over:
        terminalreporter.write_sep("-", f"mixers over the {MIXER_TEST_BUDGET_S:.0f} s registry-wide test budget")
        for mixer, seconds in over.items():
            terminalreporter.write_line(f"{seconds:7.1f} s  {mixer}")
