"""`ortllava bench`: transformers and ortllava on the same weights and inputs, and the figures' plot."""
