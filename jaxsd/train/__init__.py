"""jaxsd.train (see DESIGN.md)."""
