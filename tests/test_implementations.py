"""The built-in pure-JAX implementations against the float64 oracle (the shared suite)."""

from attention_suite import AttentionSuite


class TestXla(AttentionSuite):
    implementation = "xla"


class TestChunked(AttentionSuite):
    implementation = "chunked"
    second_order = False
