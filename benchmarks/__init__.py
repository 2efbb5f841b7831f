"""``make bench``: t5train's speed and memory, measured side by side with a peer in the same run."""
