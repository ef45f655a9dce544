"""ttt: Test-Time-Training layers and language models (PyTorch + Triton)."""
__version__ = "0.1.0"
