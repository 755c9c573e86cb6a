"""jaxsd.rollout (see DESIGN.md)."""
