"""inferd: a KServe v2 / Open Inference Protocol model server with Triton's extensions."""

__version__ = "0.1.0"
