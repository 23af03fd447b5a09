"""ext4 images: plan (layout), write, read."""
