"""``t5x.examples.decoder_only``."""
