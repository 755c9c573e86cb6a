"""jaxsd.tasks (see DESIGN.md)."""
