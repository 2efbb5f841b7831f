"""``t5x.examples``: T5X's example networks (t5, decoder_only, scalable_t5) on t5train's."""
