"""CUDA backend: kernel sources and module cache, launch helper, plans, passes."""
