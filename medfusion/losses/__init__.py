"""Losses: pure functions first, thin modules over them."""

from medfusion.losses.dice import DiceCELoss, segmentation_loss, soft_dice_loss

__all__ = ["DiceCELoss", "segmentation_loss", "soft_dice_loss"]
