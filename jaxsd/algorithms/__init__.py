"""jaxsd.algorithms (see DESIGN.md)."""
