"""Stored forms of a weight beyond plain floating tensors: what they hold, and how a factor reaches them."""
