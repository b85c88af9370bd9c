"""zohpc: zeroth-order training of deep networks over MPI."""

__version__ = "0.1.0"
