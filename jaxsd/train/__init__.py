"""jaxsd.train: the train state, the jitted step, and the loop over build / rollout / learn."""
