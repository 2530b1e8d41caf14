from .compression import CompressionCallback

__all__ = ["CompressionCallback"]
