"""Train in PyTorch or Keras, export to every format, prove parity in every runtime, deploy.

Importing this package imports no framework; see pipeline.api for the Python API.
"""
__version__ = "0.1.0"
