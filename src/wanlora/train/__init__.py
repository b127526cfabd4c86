"""Training: flow matching, timestep distributions, two experts with their own LoRAs, exact resume."""
