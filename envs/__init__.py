"""Gymnasium MDP over the autodfp library (layer 2). Not built yet: see issue 3."""
