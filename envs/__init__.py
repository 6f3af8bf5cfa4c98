"""Gymnasium MDP over the autodfp library (layer 2)."""

from envs.autodfp_env import AutoDFPEnv, EnvConfig

__all__ = ["AutoDFPEnv", "EnvConfig"]
