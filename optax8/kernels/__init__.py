"""Kernel backends: the native FFI handlers and the pure-JAX reference."""
