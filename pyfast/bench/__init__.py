"""Side-by-side kernel benchmarks against stock PyTorch (``pyfast bench``)."""
