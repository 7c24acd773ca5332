"""TF Serving deployment: model repository layout, config, warmup, client.

serving.server.LocalServer / `python -m serving`: a local stand-in for tensorflow_model_server that
speaks TF Serving's gRPC and REST APIs over a model repository (serving/models.py: versions, polling,
version policies, labels, batching). serving.client.ServingClient: a client for either server.
"""
