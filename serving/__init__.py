"""TF Serving deployment: model repository layout, config, warmup, client (planned)."""
