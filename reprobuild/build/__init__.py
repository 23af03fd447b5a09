"""The build graph: recipes, plans, derivations, the engine and its producers."""
