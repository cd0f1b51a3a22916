"""lens: attention sinks, massive activations and compression valleys, measured on the deployed path."""
