"""Limits of the GPU task bodies that a plan's shape must respect: model builders size their
tiles by them, and the code generator refuses plans that break them."""

MAX_TILE_ROWS = 256  # weight rows of one linear tile: its partial sums and staged input fit in shared memory
