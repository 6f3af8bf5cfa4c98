"""RLlib SAC + Ray Tune search service (layer 3). Not built yet: see issue 3."""
