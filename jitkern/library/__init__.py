"""jitkern's built-in ops, one module each. Each module defines ``SPEC`` and registers it."""
