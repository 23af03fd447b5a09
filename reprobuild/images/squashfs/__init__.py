"""squashfs 4.0 images: plan (layout), write, read."""
