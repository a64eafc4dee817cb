"""decode_attention(implementation="xla"): the reference behind the public API (lengths clipped, options passed)."""

from harness import DecodeAttentionTestBase


class TestXla(DecodeAttentionTestBase):
    implementation = "xla"
    examples = 3  # the XLA path is the reference: these check that the API clips lengths and passes the options
    test_random_problems_sweep = None
