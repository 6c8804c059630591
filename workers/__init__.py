"""Stage processors and the worker-process runtime."""
