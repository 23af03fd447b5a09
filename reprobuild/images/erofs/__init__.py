"""EROFS images: plan (layout), write, read."""
