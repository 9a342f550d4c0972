"""Everything that touches files, processes or Lightning."""
