"""Regional inference gateway."""
