"""Field flashing: keys and bundle signatures, content-addressed transfer, A/B installs and fleet rollouts."""
