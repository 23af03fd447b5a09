"""composefs images: what libcomposefs's mkcomposefs writes, and their digest store."""
