"""``t5x.examples.scalable_t5``."""
