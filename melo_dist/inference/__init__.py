"""Using a trained model: adapt it to new users and predict (`ColdStartModel`)."""

from melo_dist.inference.model import AdaptedUser, AdaptedUsers, ColdStartModel

__all__ = ["AdaptedUser", "AdaptedUsers", "ColdStartModel"]
