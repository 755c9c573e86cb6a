"""jaxsd.losses (see DESIGN.md)."""
