"""jaxsd.models (see DESIGN.md)."""
