"""The sparse-parameter store: signatures, the LMDB cube, pooling, cube building."""
