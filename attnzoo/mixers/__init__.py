"""Built-in token mixers; importing this package registers them."""

from attnzoo.mixers import gqa  # noqa: F401
