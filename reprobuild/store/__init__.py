"""The content-addressed store: outputs, their canonical form, roots and gc."""
